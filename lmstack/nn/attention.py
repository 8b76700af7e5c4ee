"""Multi-head attention with grouped-query / multi-query support and three interchangeable backends.

Backends (all compute softmax(q k^T * scale + mask) v and agree to ~1e-6 in fp32):
    "eager"  the textbook formula, materialising the (Tq, Tk) score matrix: the reference.
    "sdpa"   torch.nn.functional.scaled_dot_product_attention (fused kernels; the default).
    "flash"  a readable FlashAttention (Dao et al. 2022, https://arxiv.org/abs/2205.14135): tiles of
             queries and keys with an online softmax, so peak memory grows linearly with T.
A query row that may see no key at all (a left-padding position) returns zeros in every backend,
as SDPA does. Shapes: B batch, H query heads, Hkv key/value heads, G = H // Hkv, T time, D head dim.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.nn.kv_cache import packs_sequences
from lmstack.nn.masks import AttentionMask
from lmstack.nn.norms import RMSNorm
from lmstack.nn.positions import apply_rotary

ATTENTION_BACKENDS = ("sdpa", "eager", "flash")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each key/value head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                    scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Reference attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) -> (B, H, Tq, D)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, Tq, Tk)
    bias = mask.bias(*mask.slots(q.shape[2], k.shape[2], q.device), torch.float32)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    # A fully hidden row is softmax over all -inf = NaN; define it as attending to nothing.
    probs = torch.where(torch.isneginf(scores).all(-1, keepdim=True), 0.0, probs)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs.to(v.dtype) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                   scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Fused attention through PyTorch SDPA. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) -> (B, H, Tq, D)."""
    n_q, n_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask.is_plain_causal(n_q, n_k) or mask.sees_everything(n_q, n_k):
        # No mask tensor at all: lets SDPA pick its flash / memory-efficient kernels.
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal and n_q > 1, scale=scale,
                                              dropout_p=dropout_p, enable_gqa=gqa)
    q_slots, k_slots = mask.slots(n_q, n_k, q.device)
    if mask.alibi_slopes is None and mask.position_bias is None:
        attn_mask = mask.visible(q_slots, k_slots)  # bool, True = attend
    else:
        attn_mask = mask.bias(q_slots, k_slots, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                    scale: float, block_size: int = 256) -> torch.Tensor:
    """Tiled attention with an online softmax; never builds the (Tq, Tk) score matrix.

    For each block of queries it walks the blocks of keys that the mask can expose, keeping a running
    row maximum ``m``, a running softmax denominator ``l`` and an unnormalised output ``acc``; earlier
    partial sums are rescaled by exp(m_old - m_new) whenever the maximum grows.

    Args:
        q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); block_size: queries and keys per tile.
    Returns:
        (B, H, Tq, D), the same as eager attention up to float rounding.
    """
    B, H, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.view(B, Hkv, G, n_q, D)  # query heads grouped under the key/value head they share
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, Tk, D): broadcast over the group
    out = torch.empty_like(qg)
    q_slots_all, k_slots_all = mask.slots(n_q, n_k, q.device)
    for q0 in range(0, n_q, block_size):
        q1 = min(q0 + block_size, n_q)
        k_lo, k_hi = _key_range(mask, q0, q1, n_k)
        out[:, :, :, q0:q1] = _attend_query_block(
            qg[:, :, :, q0:q1], kg, vg, mask, q_slots_all[..., q0:q1], k_slots_all, k_lo, k_hi, scale, block_size)
    return out.view(B, H, n_q, D)


def _key_range(mask: AttentionMask, q0: int, q1: int, n_keys: int) -> tuple[int, int]:
    """Keys [lo, hi) that queries q0..q1-1 of any row could see; tiles outside are skipped entirely."""
    first_start, last_start = mask.q_start_range()
    hi = min(n_keys, last_start + q1) if mask.causal else n_keys
    lo = max(0, first_start + q0 - mask.sliding_window + 1) if mask.sliding_window is not None else 0
    return lo, max(lo, hi)


def _attend_query_block(qb: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, mask: AttentionMask,
                        q_slots: torch.Tensor, k_slots: torch.Tensor, k_lo: int, k_hi: int,
                        scale: float, block_size: int) -> torch.Tensor:
    """Online-softmax pass of one query block qb: (B, Hkv, G, bq, D) over keys [k_lo, k_hi)."""
    B, Hkv, G, bq, D = qb.shape
    m = torch.full((B, Hkv, G, bq, 1), float("-inf"), device=qb.device)  # running row max
    l = torch.zeros((B, Hkv, G, bq, 1), device=qb.device)  # running softmax denominator
    acc = torch.zeros((B, Hkv, G, bq, D), device=qb.device)  # running unnormalised output
    for k0 in range(k_lo, k_hi, block_size):
        k1 = min(k0 + block_size, k_hi)
        s = (qb @ kg[:, :, :, k0:k1].transpose(-2, -1)).float() * scale  # (B, Hkv, G, bq, bk)
        bias = mask.bias(q_slots, k_slots[k0:k1], torch.float32)  # (B|1, H|1, bq, bk)
        if bias is not None:
            s = s + _group_heads(bias, Hkv, G)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)  # rows that have seen no key yet
        p = torch.exp(s - m_safe)
        correction = torch.exp(m - m_safe)
        l = l * correction + p.sum(-1, keepdim=True)
        acc = acc * correction + p.to(vg.dtype) @ vg[:, :, :, k0:k1]
        m = m_new
    return torch.where(l > 0, acc / l.clamp_min(1e-30), 0.0).to(qb.dtype)


def _group_heads(bias: torch.Tensor, n_kv_heads: int, group: int) -> torch.Tensor:
    """(B|1, H|1, bq, bk) -> (B|1, Hkv|1, G|1, bq, bk) to line up with grouped query heads."""
    if bias.shape[1] == 1:
        return bias.unsqueeze(2)
    return bias.view(bias.shape[0], n_kv_heads, group, *bias.shape[2:])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, *,
           scale: float | None = None, backend: str = "sdpa", dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention through the chosen backend.

    Args:
        q: (B, H, Tq, D) queries; k, v: (B, Hkv, Tk, D) with H divisible by Hkv.
        mask: which keys each query may see.
        scale: score multiplier, default 1/sqrt(D).
        backend: "sdpa", "eager" or "flash".
        dropout_p: attention-probability dropout (training only; not supported by "flash").
    Returns:
        (B, H, Tq, D).
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "sdpa":
        return sdpa_attention(q, k, v, mask, scale, dropout_p)
    if backend == "eager":
        return eager_attention(q, k, v, mask, scale, dropout_p)
    if backend == "flash":
        if dropout_p > 0:
            raise ValueError("the 'flash' attention backend does not implement dropout; use 'sdpa' to train")
        return flash_attention(q, k, v, mask, scale)
    raise ConfigError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")


class Attention(nn.Module):
    """Multi-head self-attention: MHA (Hkv = H), grouped-query (1 < Hkv < H) or multi-query (Hkv = 1).

    Args:
        dim: model width C.
        n_heads: query heads H.
        n_kv_heads: key/value heads Hkv (default H).
        head_dim: per-head width D (default C // H).
        qkv_bias: bias on q/k/v projections (GPT-2, Qwen2).
        out_bias: bias on the output projection (GPT-2).
        dropout: attention-probability dropout while training.
        backend: "sdpa" (default), "eager" or "flash"; see ``set_attention_backend``.
        scale: score multiplier; default 1/sqrt(head_dim) (T5 uses 1.0: its scale lives in the init).
        qk_norm_eps: if set, RMSNorm (of this eps) over each head's query and key before RoPE (Qwen3:
            ``q_norm`` / ``k_norm``, one weight of width D shared by the heads).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, dropout: float = 0.0,
                 backend: str = "sdpa", scale: float | None = None, qk_norm_eps: float | None = None) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        head_dim = head_dim or dim // n_heads
        if n_heads % n_kv_heads:
            raise ConfigError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.dropout, self.backend, self.scale = dropout, backend, scale
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``x`` (B, S, C): each (B, Hkv, S, D). Cross-attention computes them once
        from the encoder output and passes them to every decoding step as ``kv``."""
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k.transpose(1, 2), v

    def forward(self, x: torch.Tensor, mask: AttentionMask,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache=None, layer_idx: int = 0,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attend from x: (B, T, C) to itself, or to ``kv`` when given -> (B, T, C).

        Args:
            rotary: (cos, sin) each (B, T, D), applied to q and k.
            kv_cache: a KVCache receiving this call's keys/values (self-attention only).
            kv: precomputed (keys, values), each (B, Hkv, S, D), from ``project_kv`` (cross-attention).
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, H, T, D)
        if kv is not None:
            k, v = kv
        else:
            k, v = self.project_kv(x)  # (B, Hkv, T, D)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if packs_sequences(kv_cache):  # a serving batch: the cache attends within each packed sequence
                y = kv_cache.attend(layer_idx, q, k, v, mask, self.scale, self.backend)
                return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
            if kv_cache is not None:
                k, v = kv_cache.update(layer_idx, k, v)  # (B, Hkv, cached + T, D)
        dropout_p = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, scale=self.scale, backend=self.backend, dropout_p=dropout_p)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every Attention module in ``model`` to ``backend`` ("sdpa", "eager", "flash"); returns model."""
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
    return model
