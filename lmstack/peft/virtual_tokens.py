"""Prompt learning's shared mechanism: a whole model (Decoder or Encoder) made to run with P virtual tokens
in front of every sequence that its callers never see.

Prefix tuning (``prefix.py``) puts P learned keys/values in front of each layer's own; prompt tuning
(``prompt.py``) puts P learned embeddings in front of the input. Either way the model's class is swapped for
a subclass (as ``adapted.py`` does for linears) whose ``hidden_states`` takes the same arguments and
returns states for the caller's tokens only, (B, T, C); what changes inside is

    attention_mask (B, cached + T)  ->  ones(B, P) ++ attention_mask   (the virtual slots are always visible)
    position_ids   (B, T)           ->  position_ids + P               (peft's numbering: the virtual tokens
                                                                        come first)
    kv_cache                        ->  the first P slots are the virtual tokens' (filled on the first call)

so training code, the loss and the decoding engine run unchanged: the engine's cache grows by
``reserved_cache_slots`` (``StaticKVCache.for_model``), and the fused decoding step stands aside (it
reads plain models only). The model's own code learns nothing of this.
"""

import inspect

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.nn.transforms import TransformError
from lmstack.peft.adapted import PeftLayer, adapt_

_SIGNATURES: dict[type, inspect.Signature] = {}


class VirtualTokensModel(PeftLayer):
    """Mixed in before a Decoder's or Encoder's class; subclasses fill ``_run`` (called with the bound
    arguments of the base ``hidden_states`` as a dict, when the method is enabled)."""

    save_hint = "save the adapter (lmstack.peft.save_adapter): learned virtual tokens cannot be folded into weights"
    merged = False

    @property
    def reserved_cache_slots(self) -> int:
        """Leading KV-cache slots the virtual tokens take (``StaticKVCache.for_model`` adds them)."""
        return self.num_virtual_tokens

    def hidden_states(self, *args, **kwargs) -> torch.Tensor:
        """The base model's ``hidden_states`` (same arguments) with the virtual tokens in front: (B, T, C)."""
        if not self.adapter_enabled:
            return super().hidden_states(*args, **kwargs)
        return self._run(self._bind(args, kwargs))

    def _base_hidden_states(self, **call) -> torch.Tensor:
        """The base model's own ``hidden_states`` (no virtual tokens)."""
        return self._base_class().hidden_states(self, **call)

    def _base_class(self) -> type:
        mro = type(self).__mro__
        return next(c for c in mro[mro.index(VirtualTokensModel) + 1:] if "hidden_states" in c.__dict__)

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        """The arguments of a ``hidden_states`` call by name, defaults filled in."""
        cls = self._base_class()
        if cls not in _SIGNATURES:
            _SIGNATURES[cls] = inspect.signature(cls.hidden_states)
        bound = _SIGNATURES[cls].bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        del call["self"]
        return call

    def _run(self, call: dict) -> torch.Tensor:
        raise NotImplementedError

    def _widen(self, call: dict, batch: int, device: torch.device) -> None:
        """Mask and positions of this call extended over the P virtual slots (in place); checks the context."""
        P = self.num_virtual_tokens
        cache = call.get("kv_cache")
        new = call_tokens(call).shape[1]
        used = cache.length if cache is not None and cache.length > 0 else P
        limit = self.config.context_limit
        if limit is not None and self.takes_context(self) and used + new > limit:
            raise ValueError(f"{P} virtual tokens ({self.transform_name}) + {used - P + new} tokens = {used + new} "
                             f"exceed the model's context of {limit}; shorten the input")
        mask = call.get("attention_mask")
        if mask is not None:
            call["attention_mask"] = torch.cat([torch.ones(batch, P, dtype=mask.dtype, device=device), mask], dim=1)
        if call.get("position_ids") is not None:
            call["position_ids"] = call["position_ids"] + P

    @staticmethod
    def takes_context(model: nn.Module) -> bool:
        """Whether the virtual tokens take positions of ``model``'s context (an encoder's prefix does not)."""
        return True

    def merge(self) -> None:
        raise TransformError(f"{self.transform_name} cannot be merged into the weights; save the adapter instead")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def extra_repr(self) -> str:
        return f"{self.transform_name}: {self.num_virtual_tokens} virtual tokens"


def call_tokens(call: dict) -> torch.Tensor:
    """The call's input_ids (B, T) or inputs_embeds (B, T, C)."""
    tokens = call.get("input_ids")
    return tokens if tokens is not None else call["inputs_embeds"]


def adapt_model_(model: nn.Module, mixin: type, num_virtual_tokens: int) -> nn.Module:
    """Swap ``model``'s class for ``mixin`` over it after the checks prompt learning needs."""
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ConfigError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    if not hasattr(model, "hidden_states") or not hasattr(model, "embed_tokens") or not hasattr(model, "layers"):
        raise ConfigError(f"{mixin.transform_name} applies to a Decoder or an Encoder, not a {type(model).__name__}")
    limit = model.config.context_limit
    if limit is not None and num_virtual_tokens >= limit and mixin.takes_context(model):
        raise ConfigError(f"{num_virtual_tokens} virtual tokens of {mixin.transform_name} leave no room in the "
                          f"model's context of {limit} tokens; use fewer")
    adapt_(model, mixin)
    model.num_virtual_tokens = num_virtual_tokens
    model.adapter_enabled = True
    return model


def virtual_device(model: nn.Module) -> torch.device:
    return model.embed_tokens.weight.device if hasattr(model.embed_tokens, "weight") else \
        next(model.embed_tokens.buffers()).device
