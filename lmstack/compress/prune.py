"""Unstructured and N:M pruning: ``prune_(model, method, sparsity)`` zeroes weights of a model's linears and keeps
them zero through any later training.

    from lmstack.compress import prune_, sparsity_report
    prune_(model, "wanda", 0.5, calibration=batches)        # 50% of each output row, by |W|·‖X‖
    prune_(model, "sparsegpt", pattern="2:4", calibration=batches)
    print(sparsity_report(model))

Methods (the score decides which weights go; a mask True keeps the weight):

- ``magnitude``: the smallest |W|; ``scope="layer"`` takes the fraction of each matrix (exactly
  ``torch.nn.utils.prune.l1_unstructured``), ``scope="global"`` one threshold over all of them
  (``global_unstructured``).
- ``wanda`` (Sun et al., 2023): |W_ij|·‖X_j‖₂, with X_j input channel j over the calibration tokens, compared
  within each output row (the paper's rule; torchao's WandaSparsifier ranks the whole matrix instead).
- ``sparsegpt`` (Frantar & Alistarh, 2023): visits the input columns in blocks of 128, picks the block's mask by
  w²/[H⁻¹]²_jj and spreads each pruned weight's error over the columns not yet visited (the OBS update, with
  the Hessian H = 2XᵀX/n of the layer's squared output error), so the kept weights are reconstructed.

``pattern="N:M"`` keeps N of every M consecutive input weights (2:4 is the semi-structured layout sparse tensor
cores run) in place of a fraction. Statistics come from one forward pass of the unpruned model over the
calibration batches (the one-shot variant; the papers' sequential layer-by-layer pass is not done here).

Masks stay applied (``keep_masks_``): each pruned linear holds its mask as a buffer, its gradient is masked
(Adam's moments of a pruned weight stay 0, so its update is exactly 0) and training forwards re-apply it, so
fine-tuning after pruning keeps the zeros. ``GradualPruning`` raises magnitude sparsity on the cubic schedule
of Zhu & Gupta (2017) during fine-tuning.
"""

import torch
from torch import nn

from lmstack.compress.calibrated import collect_input_stats
from lmstack.compress.quantize import quantization_targets
from lmstack.compress.settings import check_sparsity, parse_pattern
from lmstack.errors import ConfigError

METHODS = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("layer", "global")
SPARSEGPT_BLOCK = 128


# --- masks from scores (True keeps) ----------------------------------------------------------------------

def magnitude_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the round(sparsity·numel) smallest scores of the whole tensor (torch's ``l1_unstructured`` rule)."""
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    k = round(sparsity * scores.numel())
    if k:
        mask[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the int(sparsity·in) smallest scores of every output row (Wanda's per-output comparison group)."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores of every m consecutive inputs of each row. scores: (out, in), in % m == 0."""
    out, width = scores.shape
    if width % m:
        raise ConfigError(f"an {n}:{m} pattern needs an input width divisible by {m}, got {width}")
    groups = scores.reshape(out, width // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.reshape(out, width)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over every tensor: the round(sparsity·total) smallest scores of all of them go
    (torch's ``global_unstructured``)."""
    flat = magnitude_mask(torch.cat([s.reshape(-1) for s in scores.values()]), sparsity)
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = flat[start:start + s.numel()].view_as(s)
        start += s.numel()
    return masks


# --- SparseGPT ---------------------------------------------------------------------------------------------

def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None,
                    *, damp: float = 0.01, block_size: int = SPARSEGPT_BLOCK) -> torch.Tensor:
    """The pruned and reconstructed weight (out, in) given the Hessian (in, in) of the layer's inputs."""
    W = weight.clone().double()
    H = hessian.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    # The upper Cholesky factor of H^-1: each column's row of the inverse Hessian without re-inverting.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for start in range(0, W.shape[1], block_size):
        stop = min(start + block_size, W.shape[1])
        W1, Hinv1 = W[:, start:stop].clone(), Hinv[start:stop, start:stop]
        errors = torch.zeros_like(W1)
        saliency = lambda cols: W1[:, cols] ** 2 / torch.diag(Hinv1)[cols][None, :] ** 2  # noqa: E731
        if pattern is None:  # the block's mask at once, by OBS saliency, with the block's own threshold
            keep = magnitude_mask(saliency(slice(None)), sparsity)
        else:
            keep = torch.ones_like(W1, dtype=torch.bool)
        for i in range(stop - start):
            if pattern is not None and i % pattern[1] == 0:  # each group of M chosen once its columns are updated
                cols = slice(i, i + pattern[1])
                drop = torch.topk(saliency(cols), pattern[1] - pattern[0], dim=1, largest=False).indices
                keep[:, cols] = keep[:, cols].scatter(1, drop, False)
            w = W1[:, i]
            q = torch.where(keep[:, i], w, torch.zeros_like(w))
            error = (w - q) / Hinv1[i, i]
            W1[:, i:] -= error[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            errors[:, i] = error
        W[:, start:stop] = W1
        W[:, stop:] -= errors @ Hinv[start:stop, stop:]
    return W.to(weight.dtype)


# --- the transform ----------------------------------------------------------------------------------------

def prune_targets(model: nn.Module, lm_head: bool = False, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Qualified name -> linear, for every linear ``prune_`` prunes (not the LM head unless asked)."""
    return quantization_targets(model, lm_head=lm_head, exclude=exclude)


def prune_(model: nn.Module, method: str = "magnitude", sparsity: float = 0.5, *, pattern: str | None = None,
           scope: str = "layer", calibration: list[torch.Tensor] | None = None, lm_head: bool = False,
           exclude: tuple[str, ...] = (), progress=None) -> nn.Module:
    """Prune ``model``'s linears in place and keep the masks applied (returns ``model``).

    Args:
        method: "magnitude", "wanda" or "sparsegpt" (the module docstring).
        sparsity: fraction of each target's weights to zero, in [0, 1) (ignored with ``pattern``).
        pattern: "N:M" keeps N of every M consecutive input weights (e.g. "2:4").
        scope: "layer" (each matrix its fraction) or "global" (one magnitude threshold; magnitude only).
        calibration: token-id batches (B, T) for wanda and sparsegpt.
        lm_head / exclude: prune the LM head too; fnmatch patterns of linears to leave dense.
        progress: ``progress(done, total)`` after each layer.
    Raises:
        ConfigError: an unknown method or scope, a sparsity outside [0, 1), a bad N:M pattern or a width it
            does not divide, a calibrated method without calibration. Nothing is pruned then.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ConfigError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
    sparsity = check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    if scope == "global" and (method != "magnitude" or nm):
        raise ConfigError("scope='global' (one threshold over all layers) is for unstructured magnitude pruning")
    targets = prune_targets(model, lm_head, exclude)
    if nm:
        for name, module in targets.items():
            if module.in_features % nm[1]:
                raise ConfigError(f"{name}: pattern {pattern} needs in_features divisible by {nm[1]}, "
                                  f"got {module.in_features}")
    if method != "magnitude" and not calibration:
        raise ConfigError(f"{method} needs calibration text (token batches)")
    stats = collect_input_stats(model, targets, "gptq", calibration) if method != "magnitude" else {}
    masks = {}
    if scope == "global":
        masks = global_masks({n: m.weight.detach().abs() for n, m in targets.items()}, sparsity)
    for i, (name, module) in enumerate(targets.items()):
        weight = module.weight.detach().float()
        if method == "sparsegpt":
            seen = stats.pop(name)
            hessian = seen.xtx * (2.0 / max(seen.rows, 1))
            pruned = sparsegpt_prune(weight, hessian, sparsity, nm)
            masks[name] = pruned != 0
            with torch.no_grad():
                module.weight.copy_(pruned)
        elif name not in masks:
            scores = weight.abs()
            if method == "wanda":
                scores = scores * torch.diag(stats.pop(name).xtx).float().sqrt()[None, :]
            masks[name] = (nm_mask(scores, *nm) if nm else row_mask(scores, sparsity) if method == "wanda"
                           else magnitude_mask(scores, sparsity))
        if progress is not None:
            progress(i + 1, len(targets))
    keep_masks_(model, masks)
    model.pruning = {"method": method, "sparsity": None if nm else sparsity, "pattern": pattern, "scope": scope,
                     "lm_head": lm_head, "exclude": list(exclude)}
    return model


# --- masks kept through training ------------------------------------------------------------------------

def keep_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero each named linear's weight where its mask is False and keep it so: the mask becomes a buffer
    ``weight_mask`` (not saved: the zeros are the record), the weight's gradient is masked and every training
    forward re-applies it. Replaces masks set before on the same modules."""
    for name, mask in masks.items():
        module = model.get_submodule(name)
        release_mask_(module)
        module.register_buffer("weight_mask", mask.to(module.weight.device, torch.bool), persistent=False)
        apply_mask_(module)
        module._mask_hooks = (module.register_forward_pre_hook(_reapply_while_training),
                              module.weight.register_hook(lambda grad, m=module: grad * m.weight_mask))
    return model


def masks_from_zeros(model: nn.Module, lm_head: bool = False, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The masks a pruned checkpoint implies: every target weight that is not exactly zero is kept."""
    return {name: module.weight.detach() != 0 for name, module in prune_targets(model, lm_head, exclude).items()}


def apply_mask_(module: nn.Module) -> None:
    with torch.no_grad():
        module.weight.mul_(module.weight_mask)


def apply_masks_(model: nn.Module) -> None:
    """Re-zero every masked weight (after an optimizer step that moved it)."""
    for module in model.modules():
        if getattr(module, "weight_mask", None) is not None:
            apply_mask_(module)


def release_mask_(module: nn.Module) -> None:
    """Drop a linear's mask and its hooks (its zeros stay)."""
    for hook in getattr(module, "_mask_hooks", ()):
        hook.remove()
    module._mask_hooks = ()
    if "weight_mask" in module._buffers:
        del module._buffers["weight_mask"]


def _reapply_while_training(module: nn.Module, _args) -> None:
    if module.training:
        apply_mask_(module)


# --- the report -----------------------------------------------------------------------------------------

def sparsity_report(model: nn.Module, lm_head: bool = True) -> str:
    """A per-layer table: each linear's zeros and sparsity, then the linears' total and the whole model's
    (every parameter, embeddings and norms included: the honest figure)."""
    rows, zeros, total = [], 0, 0
    for name, module in prune_targets(model, lm_head).items():
        z, n = int((module.weight == 0).sum()), module.weight.numel()
        rows.append(f"{name:<40} {tuple(module.weight.shape)!s:>14} {z:>12,} {z / n:>9.1%}")
        zeros, total = zeros + z, total + n
    seen, all_zeros, all_total = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            all_zeros, all_total = all_zeros + int((p == 0).sum()), all_total + p.numel()
    header = f"{'layer':<40} {'shape':>14} {'zeros':>12} {'sparsity':>9}"
    return "\n".join([header, *rows,
                      f"{'linears':<40} {'':>14} {zeros:>12,} {zeros / max(total, 1):>9.1%}",
                      f"{'all parameters':<40} {'':>14} {all_zeros:>12,} {all_zeros / max(all_total, 1):>9.1%}"])


# --- gradual pruning during fine-tuning ------------------------------------------------------------------

class GradualPruning:
    """Magnitude pruning raised on Zhu & Gupta's cubic schedule while a model trains: at steps ``start``,
    ``start + every``, ... below ``end``, and at ``end`` itself (where the final sparsity is reached even when
    ``every`` does not divide ``end - start``), the masks are recomputed at

        s_t = s_f + (s_i - s_f) · (1 - (t - start) / (end - start))³

    (the sparsity rises fast, then slowly, so the network recovers between prunings). Call it after every
    optimizer step with the step reached (the Trainer's ``step_callbacks``), and once before training with the
    starting step (0, or a resumed step: the masks in force are then read back from the checkpoint's zeros).
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start: int, end: int, every: int = 1, *,
                 initial_sparsity: float = 0.0, scope: str = "layer", exclude: tuple[str, ...] = ()) -> None:
        self.final = check_sparsity(final_sparsity, "final sparsity")
        self.initial = check_sparsity(initial_sparsity, "initial sparsity")
        if not (0 <= start < end and every >= 1):
            raise ConfigError(f"gradual pruning needs 0 <= start < end and every >= 1, got start={start}, "
                              f"end={end}, every={every}")
        if scope not in SCOPES:
            raise ConfigError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
        self.model, self.start, self.end, self.every, self.scope, self.exclude = model, start, end, every, scope, exclude
        self._built = False

    def sparsity_at(self, step: int) -> float:
        """The sparsity in force after ``step``: that of the last pruning step at or before it (0 before start)."""
        if step < self.start:
            return 0.0
        last = self.end if step >= self.end else self.start + (step - self.start) // self.every * self.every
        progress = (last - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def __call__(self, step: int) -> None:
        due = step == self.end or (self.start <= step < self.end and (step - self.start) % self.every == 0)
        if due:
            targets = prune_targets(self.model, exclude=self.exclude)
            scores = {n: m.weight.detach().abs() for n, m in targets.items()}
            s = self.sparsity_at(step)
            masks = (global_masks(scores, s) if self.scope == "global"
                     else {n: magnitude_mask(v, s) for n, v in scores.items()})
            keep_masks_(self.model, masks)
            self._built = True
        elif not self._built and step >= self.start:
            # Resumed between prunings: the masks in force are the saved weights' zeros (a magnitude rebuild
            # would agree only up to ties).
            keep_masks_(self.model, masks_from_zeros(self.model, exclude=self.exclude))
            self._built = True
        else:
            apply_masks_(self.model)  # the optimizer may have moved weights pruned by a changed mask
