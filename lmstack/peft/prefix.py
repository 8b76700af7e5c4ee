"""Prefix tuning (Li & Liang, 2021): P learned keys and values in front of every layer's own.

    prefix = encoder()                       (P, L * 2 * Hkv * D)   embedding, or MLP(embedding) when projected
    layer l: keys   = prefix[:, 2l]   ++ k   (B, Hkv, P + T, D)     already in post-RoPE key space
             values = prefix[:, 2l+1] ++ v

The layout is peft's (``prompt_embeddings`` of shape (P, L*2*Hkv*D), key/value heads as in grouped-query
attention), so files are interchangeable. A decoder numbers its tokens P..P+T-1, as peft's cache does; an
encoder keeps 0..T-1 (absolute positions belong to real tokens). The reparameterisation MLP (``projection``:
Linear(Hkv*D, projection) -> tanh -> Linear(projection, L*2*Hkv*D)) steadies training; only its output is
saved, as peft does, so a loaded prefix is a plain table.
"""

import torch
from torch import nn

from lmstack.models.decoder import Decoder
from lmstack.nn.kv_cache import PrefixKVCache
from lmstack.peft.adapted import materialize_
from lmstack.peft.virtual_tokens import VirtualTokensModel, call_tokens, virtual_device


class PrefixEncoder(nn.Module):
    """The learned prefix: a (P, width) table, or a (P, token_dim) table through a two-layer tanh MLP."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, width: int, projection: int | None,
                 device: torch.device) -> None:
        super().__init__()
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(token_dim, projection, device=device), nn.Tanh(),
                                           nn.Linear(projection, width, device=device))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width, device=device)

    def forward(self) -> torch.Tensor:
        """-> (P, width)."""
        table = self.embedding.weight
        return self.transform(table) if self.projection else table


class PrefixTuningModel(VirtualTokensModel):
    """Mixed in before a Decoder's or Encoder's class by ``apply_prefix_tuning``."""

    transform_name = "prefix tuning"

    def add_prefix(self, projection: int | None) -> None:
        cfg = self.config
        self.prefix_kv_heads = getattr(cfg, "n_kv_heads", cfg.n_heads)
        self.prefix_head_dim = getattr(cfg, "head_dim", None) or cfg.dim // cfg.n_heads
        token_dim = self.prefix_kv_heads * self.prefix_head_dim
        self.prefix_encoder = PrefixEncoder(self.num_virtual_tokens, token_dim, cfg.n_layers * 2 * token_dim,
                                            projection, virtual_device(self))
        if not self.prefix_encoder.embedding.weight.is_meta:
            self.initialize_added_()

    def added_tensors(self) -> list[str]:
        return [f"prefix_encoder.{name}" for name in self.prefix_encoder.state_dict()]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {f"prefix_encoder.{name}": p for name, p in self.prefix_encoder.named_parameters()}

    def initialize_added_(self) -> None:
        """peft's initialisation: N(0, 1) table, PyTorch's default for the MLP."""
        materialize_(self.prefix_encoder, virtual_device(self))
        self.prefix_encoder.embedding.reset_parameters()
        if self.prefix_encoder.projection:
            for layer in self.prefix_encoder.transform:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()

    @staticmethod
    def takes_context(model: nn.Module) -> bool:
        return isinstance(model, Decoder)

    def prefix_kv(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values) each (batch, Hkv, P, D)."""
        P, L = self.num_virtual_tokens, self.config.n_layers
        table = self.prefix_encoder().view(P, 2 * L, self.prefix_kv_heads, self.prefix_head_dim)
        table = table.permute(1, 2, 0, 3)  # (2L, Hkv, P, D): rows 2l and 2l+1 are layer l's keys and values
        return [(table[2 * l].expand(batch, -1, -1, -1), table[2 * l + 1].expand(batch, -1, -1, -1))
                for l in range(L)]

    def _run(self, call: dict) -> torch.Tensor:
        B = call_tokens(call).shape[0]
        cache = call.get("kv_cache")
        self._widen(call, B, call_tokens(call).device)
        if cache is None:
            call["kv_cache"] = PrefixKVCache(self.prefix_kv(B))
        elif cache.length == 0:  # a decoding cache: its first P slots get the prefix, once
            for layer, (k, v) in enumerate(self.prefix_kv(B)):
                cache.update(layer, k, v)
            cache.advance(self.num_virtual_tokens)
        return self._base_hidden_states(**call)

    def remove_adapter(self) -> None:
        del self.prefix_encoder
        for name in ("num_virtual_tokens", "adapter_enabled", "prefix_kv_heads", "prefix_head_dim"):
            self.__dict__.pop(name, None)
