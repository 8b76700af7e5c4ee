"""Apply, merge, disable and remove PEFT methods on a plain model.

    from lmstack.peft import apply_lora, merge_, disabled, trainable_parameters
    apply_lora(model, rank=8, alpha=16)                 # targets: the family's default (q_proj, v_proj)
    print(trainable_parameters(model))                  # trainable 0.17M of 135M (0.12%)
    with disabled(model): reference = model(ids)        # the base model (DPO's reference)
    merge_(model)                                       # W += s B A; save_hf then writes a plain checkpoint

Targets are module-name patterns as peft reads them: a list of names, each matching a module whose
qualified name equals it or ends with "." + it ("q_proj"), or a glob ("layers.1*.attn.v_proj"); a single
string is a regular expression the whole name must match. LoRA and IA3 adapt linear layers; bottleneck
adapters whole sub-layers (each block's ``attn`` and ``mlp``); prefix and prompt tuning the whole model.
"""

import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from lmstack.errors import ConfigError
from lmstack.models.registry import family_for_config
from lmstack.peft.adapted import PeftLayer, adapt_, linear_layers, restore_
from lmstack.peft.bottleneck import ACTIVATIONS, BottleneckLayer
from lmstack.peft.ia3 import IA3Layer
from lmstack.peft.lora import LoRALayer
from lmstack.peft.prefix import PrefixTuningModel
from lmstack.peft.prompt import PromptTuningModel
from lmstack.peft.virtual_tokens import adapt_model_

Targets = list[str] | tuple[str, ...] | str | None


def matches(name: str, targets: list[str] | tuple[str, ...] | str) -> bool:
    """Whether module ``name`` is one of ``targets`` (see the module docstring)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) or (any(c in t for c in "*?[") and fnmatch.fnmatch(name, t))
               for t in targets)


def default_targets(model: nn.Module, method: str) -> tuple[str, ...]:
    """The model family's default targets for ``method`` ("lora", "ia3", "ia3_feedforward"), from the registry."""
    family = family_for_config(model.config)
    return {"lora": family.lora_targets, "ia3": family.ia3_targets, "ia3_feedforward": family.ia3_feedforward}[method]


def find_targets(model: nn.Module, targets: Targets, method: str = "lora") -> dict[str, nn.Module]:
    """Qualified name -> linear layer for each layer ``targets`` names (the family's default if None).

    Raises:
        ConfigError: a pattern that matches no linear layer (each list entry is checked on its own).
    """
    given = targets is not None
    targets = targets if given else default_targets(model, method)
    linears = linear_layers(model)
    found = {name: m for name, m in linears.items() if matches(name, targets)}
    patterns = [targets] if isinstance(targets, str) else list(targets)
    # Each pattern given must name something (a typo is an error); the family's defaults need only in all
    # (T5 has either fc_out or down_proj, by config).
    unmatched = [t for t in patterns if given and not any(
        matches(name, t if isinstance(targets, str) else [t]) for name in linears)]
    if unmatched or not found:
        sample = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ConfigError(f"target pattern(s) {unmatched or targets} match no linear layer of this model; its linear "
                          f"layers are named {sample}")
    taken = sorted(name for name, m in found.items() if isinstance(m, PeftLayer))
    if taken:  # checked before anything is adapted: an error never leaves a half-transformed model
        raise ConfigError(f"{taken[:3]} already carry a {found[taken[0]].transform_name} transform; remove it "
                          f"(lmstack.peft.remove_) or choose other targets")
    return found


def apply_lora(model: nn.Module, targets: Targets = None, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               use_rslora: bool = False, use_dora: bool = False, trainable: Targets = ()) -> nn.Module:
    """Add LoRA (or DoRA with ``use_dora``) to each target linear, in place; returns ``model``.

    Every other parameter is frozen, except modules matching ``trainable`` (a new classification head,
    say: peft's ``modules_to_save``). Works on the meta device (``load_model(path, transforms=[...])``).

    Raises:
        ConfigError: rank < 1, alpha <= 0, dropout outside [0, 1), targets that match nothing.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    layers = find_targets(model, targets, "lora")
    _freeze(model, trainable)
    for layer in layers.values():
        adapt_(layer, LoRALayer).add_lora(rank, alpha, dropout, use_rslora, use_dora)
    return model


def apply_ia3(model: nn.Module, targets: Targets = None, feedforward: Targets = None, trainable: Targets = ()) -> nn.Module:
    """Add IA3 vectors to each target linear (inputs scaled for ``feedforward`` ones, outputs for the rest).

    Raises:
        ConfigError: targets that match nothing, or feed-forward patterns outside the targets.
    """
    layers = find_targets(model, targets, "ia3")
    feedforward = default_targets(model, "ia3_feedforward") if feedforward is None else feedforward
    if feedforward and not any(matches(name, feedforward) for name in layers):
        raise ConfigError(f"feed-forward pattern(s) {feedforward} name none of the IA3 targets {sorted(layers)[:4]}")
    _freeze(model, trainable)
    for name, layer in layers.items():
        adapt_(layer, IA3Layer).add_ia3(bool(feedforward) and matches(name, feedforward))
    return model


def apply_bottleneck(model: nn.Module, size: int = 64, activation: str = "relu", targets: Targets = ("attn", "mlp"),
                     trainable: Targets = ()) -> nn.Module:
    """Add a Houlsby bottleneck adapter of width ``size`` after each target sub-layer (by default every block's
    attention and feed-forward network), in place; returns ``model``. Other parameters are frozen but those
    in ``trainable``.

    Raises:
        ConfigError: size < 1, an unknown activation, targets that name no sub-layer, or layers already adapted.
    """
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"bottleneck adapter size must be a positive integer, got {size!r}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown adapter activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    linears = linear_layers(model)
    found = {name: m for name, m in model.named_modules() if name and matches(name, targets)
             and ".layers." in f".{name}" and name not in linears}
    if not found:
        raise ConfigError(f"target pattern(s) {targets} name no sub-layer of this model's blocks (try 'attn', 'mlp')")
    taken = sorted(name for name, m in found.items() if isinstance(m, PeftLayer))
    if taken:
        raise ConfigError(f"{taken[:3]} already carry a {found[taken[0]].transform_name} transform")
    _freeze(model, trainable)
    for module in found.values():
        adapt_(module, BottleneckLayer).add_bottleneck(model.config.dim, size, activation)
    return model


def apply_prefix_tuning(model: nn.Module, num_virtual_tokens: int = 20, projection: int | None = None,
                        trainable: Targets = ()) -> nn.Module:
    """Give ``model`` (a Decoder or Encoder) ``num_virtual_tokens`` learned keys/values in front of every
    layer's own, through a tanh MLP of width ``projection`` when set (``lmstack.peft.prefix``); in place.

    Raises:
        ConfigError: another kind of model, num_virtual_tokens < 1 or filling a decoder's context,
            projection < 1, a model already carrying prompt learning.
    """
    if projection is not None and (not isinstance(projection, int) or projection < 1):
        raise ConfigError(f"prefix projection width must be a positive integer, got {projection!r}")
    adapt_model_(model, PrefixTuningModel, num_virtual_tokens)
    _freeze(model, trainable)
    model.add_prefix(projection)
    return model


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20, init_token_ids: list[int] | None = None,
                        trainable: Targets = ()) -> nn.Module:
    """Give ``model`` (a Decoder or Encoder) ``num_virtual_tokens`` learned input embeddings in front of
    every sequence, started from ``init_token_ids``' embeddings (an initialisation text's tokens) or from
    tokens drawn at random (``lmstack.peft.prompt``); in place.

    Raises:
        ConfigError: another kind of model, num_virtual_tokens < 1 or filling the context, token ids outside
            the vocabulary, a model already carrying prompt learning.
    """
    vocab = model.config.vocab_size
    if init_token_ids is not None and (not init_token_ids or any(not 0 <= i < vocab for i in init_token_ids)):
        raise ConfigError(f"prompt initialisation token ids must be a non-empty list in [0, {vocab}), "
                          f"got {list(init_token_ids)[:8]}")
    adapt_model_(model, PromptTuningModel, num_virtual_tokens)
    _freeze(model, trainable)
    model.add_prompt(init_token_ids)
    return model


def _freeze(model: nn.Module, trainable: Targets) -> None:
    """requires_grad off for every parameter but those inside a module ``trainable`` names."""
    kept = [name for name, _ in model.named_modules() if name and trainable and matches(name, trainable)]
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(k + ".") for k in kept))


def adapter_layers(model: nn.Module) -> dict[str, PeftLayer]:
    """Qualified name -> every PEFT-adapted layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PeftLayer)}


def merge_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place (``unmerge_`` undoes it). Raises TransformError for a
    quantized base (QLoRA): dequantize first, or export merged with ``save_hf``."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge_(model: nn.Module) -> nn.Module:
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def remove_(model: nn.Module, merge: bool = False) -> nn.Module:
    """Take every adapter out (merged into the weights first with ``merge``): the plain model back."""
    for layer in adapter_layers(model).values():
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        layer.remove_adapter()
        restore_(layer)
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within: ``model`` computes as its base model (adapters skipped; merged ones taken out and put back)."""
    layers = list(adapter_layers(model).values())
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    states = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.adapter_enabled = state
        for layer in merged:
            layer.merge()


@dataclass(frozen=True)
class ParameterCount:
    """``trainable_parameters``' report."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.fraction:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (tied tensors once; quantized codes count as their weights)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params) + sum(_quantized_weights(m) for m in model.modules())
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), total)


def _quantized_weights(module: nn.Module) -> int:
    if hasattr(module, "dequantize") and hasattr(module, "in_features") and not hasattr(module, "weight"):
        return module.in_features * module.out_features
    return 0
