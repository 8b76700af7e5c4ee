"""Key/value caches for incremental decoding.

The model's forward pass is stateless; a cache is passed in explicitly. ``StaticKVCache`` preallocates
(layers, B, Hkv, max_len, D) once (gpt-fast style: index writes, no reallocation per step), so each decode
step does work proportional to the current length. Slots are positions in the cache, not token positions:
with left padding, slot j of every row holds that row's j-th token or a pad.

A serving batch holds sequences of different lengths. A ``PackedKVCache`` (``lmstack.serve.paged_kv``)
takes their new tokens packed into one row, (1, N), with each token's position in ``position_ids``; it
stores every token's keys/values in its own sequence's blocks and computes attention per sequence itself
(``attend``), so the model runs its linears once over all N tokens and never learns about paging.
"""

from typing import Protocol

import torch


class KVCache(Protocol):
    """What a model needs from a cache: write a layer's new keys/values, then advance once per call."""

    length: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at slots [length, length + T); return all keys/values so far."""
        ...

    def advance(self, n_tokens: int) -> None:
        """Mark n_tokens more slots as filled (called by the model after all layers ran)."""
        ...


class PackedKVCache(Protocol):
    """A cache over many sequences packed in one row: it computes attention itself.

    ``length`` is 0 (a packed row has no shared length; positions come from ``position_ids``)."""

    length: int

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask,
               scale: float | None, backend: str) -> torch.Tensor:
        """Store k, v (1, Hkv, N, D) in their sequences' slots, attend q (1, H, N, D) within each sequence
        (``mask`` gives the layer's window / ALiBi) and return (1, H, N, D)."""
        ...

    def advance(self, n_tokens: int) -> None: ...


def packs_sequences(cache) -> bool:
    """True for a PackedKVCache (one that computes attention itself over packed sequences)."""
    return cache is not None and callable(getattr(cache, "attend", None))


class StaticKVCache:
    """Preallocated cache for ``n_layers`` layers, ``batch_size`` rows and up to ``max_len`` slots.

    Args:
        n_layers, batch_size, max_len, n_kv_heads, head_dim: buffer shape.
        dtype, device: of the buffers (match the model's).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer views, made once: indexing the 5-D buffers on every decode step costs more than the copy.
        # (select, not unbind: autograd forbids in-place writes into unbind's multi-output views)
        self._k_layers = [self.k[i] for i in range(n_layers)]
        self._v_layers = [self.v[i] for i in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "StaticKVCache":
        """A cache shaped for ``model`` (anything with ``.config`` holding n_layers/n_kv_heads/head_dim)."""
        cfg = model.config
        p = next(model.parameters())
        # A transform that keeps leading slots of its own (prefix tuning's keys, prompt tuning's virtual
        # tokens) declares how many: the cache grows by that much so callers size it by their tokens alone.
        max_len += getattr(model, "reserved_cache_slots", 0)
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, p.dtype, p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, Hkv, T, D) -> cached keys and values (B, Hkv, length + T, D), views into the buffers."""
        start, n_new = self.length, k.shape[2]
        if start + n_new > self.max_len:
            raise ValueError(f"KV cache is full: {start + n_new} slots needed, {self.max_len} allocated")
        k_layer, v_layer = self._k_layers[layer], self._v_layers[layer]
        k_layer.narrow(2, start, n_new).copy_(k)
        v_layer.narrow(2, start, n_new).copy_(v)
        return k_layer.narrow(2, 0, start + n_new), v_layer.narrow(2, 0, start + n_new)

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (B,) in this order, e.g. the surviving beams of beam search.

        Only the filled slots are copied, so the cost follows the current length, not max_len."""
        n = self.length
        self.k[:, :, :, :n] = self.k[:, rows, :, :n]
        self.v[:, :, :, :n] = self.v[:, rows, :, :n]

    def reset(self) -> None:
        self.length = 0


class PrefixKVCache:
    """Fixed keys/values in front of each layer's own, for one forward pass without a real cache (training).

    ``update`` returns ``cat(prefix, new)`` along time and stores nothing, so gradients reach the prefix and
    the model sees exactly what a StaticKVCache prefilled with the prefix would hold.

    Args:
        prefix: per layer, (keys, values) each (B, Hkv, P, D).
    """

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.prefix = prefix
        self.length = prefix[0][0].shape[2] if prefix else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, Hkv, T, D) -> (B, Hkv, P + T, D)."""
        pk, pv = self.prefix[layer]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)

    def advance(self, n_tokens: int) -> None:
        """Nothing is kept between calls."""
