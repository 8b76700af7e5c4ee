"""Structured pruning: a genuinely smaller decoder, with fewer query heads, narrower MLPs and fewer layers.

    from lmstack.compress import prune_structured
    small = prune_structured(model, heads=0.5, channels=0.5, importance="activation", calibration=batches)
    save_hf(small, "runs/small")     # config.json: fewer num_attention_heads, a smaller intermediate_size

Every layer loses the same number of heads and channels (a Hugging Face config holds one count for all
layers), each layer choosing its own by importance:

- **heads**: with grouped-query attention, query heads are removed *within* each KV group (every group keeps
  ``group - r`` of its heads, so the key/value heads and the head -> group map stay); with plain multi-head
  attention (groups of one) whole heads go, keys and values included. ``head_dim`` stays; config.json then
  states it explicitly.
- **channels**: hidden units of the MLP (a row of gate/up or fc_in, a column of down or fc_out).
- **layers**: whole blocks, ranked by block influence (Men et al., 2024, ShortGPT): 1 - cos(x_in, x_out) of
  the residual stream over the calibration tokens; the blocks that change it least go.

Importance of a head or channel (``importance``):
- ``magnitude``: the L2 norm of all its weights (q rows and o columns; gate, up rows and down column), the
  rule of ``torch.nn.utils.prune.ln_structured`` over the group of rows it spans;
- ``activation``: ‖X_g‖₂·‖W_out[:, g]‖₂ — the size of its output on the calibration tokens (X_g its input to
  o_proj / down_proj);
- ``gradient``: |Σ g·w| over its weights, g the gradient of the calibration LM loss (first-order Taylor,
  LLM-Pruner's group importance).
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress.settings import check_sparsity
from lmstack.errors import ConfigError
from lmstack.nn.mlp import GatedMLP

IMPORTANCE = ("magnitude", "activation", "gradient")


def prune_structured(model: nn.Module, *, heads: float = 0.0, channels: float = 0.0, layers: int = 0,
                     importance: str = "magnitude", calibration: list[torch.Tensor] | None = None) -> nn.Module:
    """A new, smaller decoder: ``heads`` (fraction of each KV group's query heads), ``channels`` (fraction of
    each MLP's hidden units) and ``layers`` (a count of blocks) removed. ``model`` is left as it was.

    Raises:
        ConfigError: not a dense decoder, a fraction outside [0, 1), a head fraction that removes no head or
            every query head of a group, ``layers`` outside 0 .. n_layers - 1, an unknown importance, or
            calibration missing for ``activation`` / ``gradient`` / ``layers``.
    """
    cfg = model.config
    if not hasattr(model, "layers") or getattr(cfg, "moe", None) is not None:
        raise ConfigError(f"structured pruning takes a dense decoder; got a {type(model).__name__}"
                          + (" with experts" if getattr(cfg, "moe", None) else ""))
    if importance not in IMPORTANCE:
        raise ConfigError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE)}")
    check_sparsity(heads, "heads")
    check_sparsity(channels, "channels")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers < cfg.n_layers:
        raise ConfigError(f"layers={layers!r} must be a whole number of blocks from 0 to {cfg.n_layers - 1}")
    group = cfg.n_heads // cfg.n_kv_heads
    per_group = removed_heads(heads, cfg.n_heads, cfg.n_kv_heads)
    if per_group and cfg.position == "alibi":
        raise ConfigError("pruning heads of an ALiBi model would change every head's slope; prune channels instead")
    if (importance != "magnitude" or layers) and not calibration:
        raise ConfigError(f"importance={importance!r}{' and dropping layers' if layers else ''} need calibration "
                          "text (token batches)")
    scores = _scores(model, importance, calibration)
    drop = sorted(torch.topk(block_influence(model, calibration), layers, largest=False).indices.tolist()) if layers else []
    kept_layers = [i for i in range(cfg.n_layers) if i not in drop]
    n_channels = cfg.ffn_dim - round(channels * cfg.ffn_dim)
    if n_channels < 1:
        raise ConfigError(f"channels={channels} leaves no MLP channel of {cfg.ffn_dim}")
    new_cfg = _smaller_config(cfg, group, per_group, n_channels, kept_layers)
    small = type(model)(new_cfg)
    state = {}
    for new_i, old_i in enumerate(kept_layers):
        head_keep = _keep_heads(scores[old_i]["heads"], cfg.n_kv_heads, group, per_group, cfg.head_dim)
        channel_keep = torch.sort(torch.topk(scores[old_i]["channels"], n_channels).indices).values
        state.update(_layer_state(model.layers[old_i], new_i, head_keep, channel_keep, group == 1))
    for name, tensor in model.state_dict().items():
        if not name.startswith("layers."):
            state[name] = tensor
    small.load_state_dict(state)
    small.pruning = {"heads_removed_per_group" if group > 1 else "heads_removed": per_group,
                     "channels_removed": cfg.ffn_dim - n_channels, "layers_removed": drop, "importance": importance}
    return small


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """A new decoder of ``model``'s blocks ``layers`` (in order) and its embeddings, norm and head: a shallower
    student that starts from its teacher's weights (``keep_layers(teacher, [0, 2, 4, 6])``).

    Raises:
        ConfigError: no layers, or an index outside the model, or one given twice.
    """
    n = model.config.n_layers
    if not layers or len(set(layers)) != len(layers) or not all(isinstance(i, int) and 0 <= i < n for i in layers):
        raise ConfigError(f"layers {layers!r} must be distinct block indices from 0 to {n - 1}")
    cfg = model.config
    small = type(model)(_smaller_config(cfg, cfg.n_heads // cfg.n_kv_heads, 0, cfg.ffn_dim, list(layers)))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for new_i, old_i in enumerate(layers):
        prefix = f"layers.{old_i}."
        state.update({f"layers.{new_i}.{k[len(prefix):]}": v for k, v in model.state_dict().items()
                      if k.startswith(prefix)})
    small.load_state_dict(state)
    return small


def removed_heads(fraction: float, n_heads: int, n_kv_heads: int) -> int:
    """Query heads removed from each KV group (or, without groups, heads removed in all) for ``fraction``."""
    group = n_heads // n_kv_heads
    pool = group if group > 1 else n_heads
    count = round(fraction * pool)
    if fraction and count == 0:
        raise ConfigError(f"heads={fraction} removes no head ({'groups' if group > 1 else 'layers'} of {pool}); "
                          f"the smallest step is {1 / pool:.3g}")
    if count >= pool:
        raise ConfigError(f"heads={fraction} would remove {count} of the {pool} query heads "
                          f"{'in each KV group' if group > 1 else 'of each layer'}; keep at least one")
    return count


def _smaller_config(cfg, group: int, per_group: int, n_channels: int, kept_layers: list[int]):
    n_heads = cfg.n_kv_heads * (group - per_group) if group > 1 else cfg.n_heads - per_group
    n_kv = cfg.n_kv_heads if group > 1 else n_heads
    windows = cfg.sliding_window_layers
    if windows is not None:
        windows = tuple(kept_layers.index(i) for i in windows if i in kept_layers)
    return dataclasses.replace(cfg, n_heads=n_heads, n_kv_heads=n_kv, head_dim=cfg.head_dim, ffn_dim=n_channels,
                               n_layers=len(kept_layers), sliding_window_layers=windows)


def _keep_heads(scores: torch.Tensor, n_kv: int, group: int, per_group: int, head_dim: int) -> torch.Tensor:
    """Sorted indices of the kept query heads: the best ``group - per_group`` of each KV group (or overall)."""
    if group == 1:
        return torch.sort(torch.topk(scores, scores.numel() - per_group).indices).values
    by_group = scores.view(n_kv, group)
    best = torch.sort(torch.topk(by_group, group - per_group, dim=1).indices, dim=1).values
    return (best + torch.arange(n_kv)[:, None] * group).reshape(-1)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _layer_state(block: nn.Module, index: int, heads: torch.Tensor, channels: torch.Tensor,
                 whole_heads: bool) -> dict[str, torch.Tensor]:
    """The kept rows / columns of one block's tensors, named for layer ``index`` of the small model."""
    attn, mlp = block.attn, block.mlp
    rows = _rows(heads, attn.head_dim)
    state = dict(block.state_dict())
    cut = {"attn.q_proj.weight": (attn.q_proj.weight, 0, rows), "attn.o_proj.weight": (attn.o_proj.weight, 1, rows)}
    if attn.q_proj.bias is not None:
        cut["attn.q_proj.bias"] = (attn.q_proj.bias, 0, rows)
    if whole_heads:
        for name in ("k_proj", "v_proj"):
            proj = getattr(attn, name)
            cut[f"attn.{name}.weight"] = (proj.weight, 0, rows)
            if proj.bias is not None:
                cut[f"attn.{name}.bias"] = (proj.bias, 0, rows)
    ins, out = (("gate_proj", "up_proj"), "down_proj") if isinstance(mlp, GatedMLP) else (("fc_in",), "fc_out")
    for name in ins:
        cut[f"mlp.{name}.weight"] = (getattr(mlp, name).weight, 0, channels)
        if getattr(mlp, name).bias is not None:
            cut[f"mlp.{name}.bias"] = (getattr(mlp, name).bias, 0, channels)
    cut[f"mlp.{out}.weight"] = (getattr(mlp, out).weight, 1, channels)
    for name, (tensor, dim, keep) in cut.items():
        state[name] = tensor.detach().index_select(dim, keep).clone()
    return {f"layers.{index}.{k}": v for k, v in state.items()}


# --- importance ---------------------------------------------------------------------------------------

def _group_norms(weight: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Squared L2 norm of each run of ``size`` rows (dim 0) or columns (dim 1)."""
    w = weight.detach().float().pow(2)
    w = w if dim == 0 else w.T
    return w.reshape(-1, size, w.shape[1]).sum(dim=(1, 2))


def _mlp_parts(mlp: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    if isinstance(mlp, GatedMLP):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj
    return [mlp.fc_in], mlp.fc_out


def _scores(model: nn.Module, importance: str, calibration) -> list[dict[str, torch.Tensor]]:
    """Per layer: {"heads": (n_heads,), "channels": (ffn_dim,)} importance (higher keeps)."""
    if importance == "activation":
        return _activation_scores(model, calibration)
    if importance == "gradient":
        _accumulate_gradients(model, calibration)
    scores = []
    for block in model.layers:
        attn, (ins, out) = block.attn, _mlp_parts(block.mlp)
        parts_h = [(attn.q_proj.weight, 0), (attn.o_proj.weight, 1)]
        if attn.n_heads == attn.n_kv_heads:
            parts_h += [(attn.k_proj.weight, 0), (attn.v_proj.weight, 0)]
        parts_c = [(m.weight, 0) for m in ins] + [(out.weight, 1)]
        if importance == "magnitude":
            heads = sum(_group_norms(w, d, attn.head_dim) for w, d in parts_h).sqrt()
            channels = sum(_group_norms(w, d, 1) for w, d in parts_c).sqrt()
        else:  # |sum g * w| per group (the Taylor estimate of the loss change when the group is removed)
            heads = sum(_group_sums(w, d, attn.head_dim) for w, d in parts_h).abs()
            channels = sum(_group_sums(w, d, 1) for w, d in parts_c).abs()
        scores.append({"heads": heads, "channels": channels})
    if importance == "gradient":
        model.zero_grad(set_to_none=True)
    return scores


def _group_sums(weight: nn.Parameter, dim: int, size: int) -> torch.Tensor:
    gw = (weight.grad * weight).detach().float()
    gw = gw if dim == 0 else gw.T
    return gw.reshape(-1, size, gw.shape[1]).sum(dim=(1, 2))


def _accumulate_gradients(model: nn.Module, calibration: list[torch.Tensor]) -> None:
    """Gradients of the mean next-token loss over the calibration batches, summed in .grad."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for batch in calibration:
        logits = model(batch)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        (loss / len(calibration)).backward()
    model.train(was_training)


def _activation_scores(model: nn.Module, calibration: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """‖X_g‖₂·‖W_out[:, g]‖₂ per head (X: o_proj's input) and per channel (X: down_proj's / fc_out's input)."""
    sums: dict[nn.Module, torch.Tensor] = {}
    outs = [(block.attn.o_proj, _mlp_parts(block.mlp)[1]) for block in model.layers]

    def record(module, args):
        x = args[0].detach().float()
        sums[module] = sums.get(module, 0) + x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0)

    hooks = [m.register_forward_pre_hook(record) for pair in outs for m in pair]
    try:
        with torch.no_grad():
            for batch in calibration:
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    scores = []
    for block, (o_proj, down) in zip(model.layers, outs):
        d = block.attn.head_dim
        heads = (sums[o_proj].reshape(-1, d).sum(dim=1) * _group_norms(o_proj.weight, 1, d)).sqrt()
        channels = (sums[down] * _group_norms(down.weight, 1, 1)).sqrt()
        scores.append({"heads": heads, "channels": channels})
    return scores


@torch.no_grad()
def block_influence(model: nn.Module, calibration: list[torch.Tensor]) -> torch.Tensor:
    """(n_layers,) 1 - mean cosine similarity of each block's input and output over the calibration tokens."""
    total = torch.zeros(len(model.layers), dtype=torch.float64)
    count = 0
    ins: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.register_forward_pre_hook(lambda _m, args, i=i: ins.__setitem__(i, args[0].detach())))
        hooks.append(block.register_forward_hook(
            lambda _m, _args, out, i=i: total.__setitem__(i, total[i] + (1 - F.cosine_similarity(
                ins[i].float(), (out[0] if isinstance(out, tuple) else out).float(), dim=-1)).sum().double())))
    try:
        for batch in calibration:
            model(batch)
            count += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return (total / max(count, 1)).float()
