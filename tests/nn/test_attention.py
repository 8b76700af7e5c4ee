"""Attention backends against an explicit, loop-built reference: every mask kind, GQA/MQA, cache offsets."""

import math

import pytest
import torch

from lmstack.nn import Attention, AttentionMask, alibi_slopes, attend
from lmstack.nn.attention import flash_attention

B, D = 2, 8


def reference_attention(q, k, v, *, causal, window=None, key_padding=None, q_start=0, slopes=None):
    """softmax(q k^T / sqrt(D) + mask) v, with the mask written out one (query, key) pair at a time."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                slot = q_start + i
                scores, keep = [], []
                for j in range(k.shape[2]):
                    visible = (not causal or j <= slot) and (window is None or slot - j < window)
                    visible = visible and (key_padding is None or bool(key_padding[b, j]))
                    if visible:
                        s = float(q[b, h, i] @ k[b, h, j]) / math.sqrt(q.shape[-1])
                        scores.append(s - (float(slopes[h]) * (slot - j) if slopes is not None else 0.0))
                        keep.append(j)
                if keep:  # a query that sees no key outputs zeros
                    probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                    out[b, h, i] = (probs.to(v.dtype)[:, None] * v[b, h, keep]).sum(0)
    return out


CASES = {
    "causal": dict(causal=True),
    "bidirectional": dict(causal=False),
    "window": dict(causal=True, window=3),
    "left-padding": dict(causal=True, key_padding=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])),
    "right-padding-window": dict(causal=True, window=4, key_padding=torch.tensor([[1] * 9, [1] * 5 + [0] * 4])),
    "alibi": dict(causal=True, slopes=alibi_slopes(6)),
    "alibi-left-padding": dict(causal=True, slopes=alibi_slopes(6),
                               key_padding=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])),
}


@pytest.mark.parametrize("heads", [(6, 6), (6, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash"])
def test_backends_match_reference(backend, case, heads):
    H, Hkv = heads
    q, k, v = torch.randn(B, H, 9, D), torch.randn(B, Hkv, 9, D), torch.randn(B, Hkv, 9, D)
    kw = CASES[case]
    mask = AttentionMask(causal=kw["causal"], sliding_window=kw.get("window"), key_padding=kw.get("key_padding"),
                         alibi_slopes=kw.get("slopes"))
    torch.testing.assert_close(attend(q, k, v, mask, backend=backend), reference_attention(q, k, v, **kw),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash"])
@pytest.mark.parametrize("n_queries", [1, 3])
def test_queries_offset_into_a_cache(backend, n_queries):
    """Queries at slots 6.. of 6 + n_queries keys, as in decoding with a KV cache."""
    q, k, v = torch.randn(B, 4, n_queries, D), torch.randn(B, 2, 6 + n_queries, D), torch.randn(B, 2, 6 + n_queries, D)
    for window in (None, 4):
        mask = AttentionMask(causal=True, sliding_window=window, q_start=6)
        want = reference_attention(q, k, v, causal=True, window=window, q_start=6)
        torch.testing.assert_close(attend(q, k, v, mask, backend=backend), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_flash_tiles_and_skipped_tiles(block_size):
    """Many tiles (including ones the causal/window mask skips) give the same result as one big tile."""
    q, k, v = torch.randn(1, 4, 19, D), torch.randn(1, 2, 19, D), torch.randn(1, 2, 19, D)
    for mask in (AttentionMask(causal=True), AttentionMask(causal=True, sliding_window=5),
                 AttentionMask(causal=False, key_padding=torch.tensor([[0] * 7 + [1] * 12]))):
        want = attend(q, k, v, mask, backend="eager")
        torch.testing.assert_close(flash_attention(q, k, v, mask, q.shape[-1] ** -0.5, block_size), want,
                                   atol=1e-5, rtol=0)


def test_fully_hidden_rows_are_zero_in_every_backend():
    q, k, v = torch.randn(1, 2, 4, D), torch.randn(1, 2, 4, D), torch.randn(1, 2, 4, D)
    mask = AttentionMask(causal=True, key_padding=torch.tensor([[0, 0, 1, 1]]))
    for backend in ("eager", "sdpa", "flash"):
        out = attend(q, k, v, mask, backend=backend)
        assert torch.isfinite(out).all()
        assert out[:, :, :2].abs().max() == 0


def test_gqa_equals_mha_with_repeated_heads():
    q, k, v = torch.randn(1, 6, 5, D), torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D)
    mask = AttentionMask(causal=True)
    grouped = attend(q, k, v, mask)
    repeated = attend(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask)
    torch.testing.assert_close(grouped, repeated, atol=1e-6, rtol=0)


def test_attention_module_shapes_and_errors():
    attn = Attention(dim=32, n_heads=4, n_kv_heads=2)
    assert attn.k_proj.out_features == 16  # 2 kv heads x head_dim 8
    assert attn(torch.randn(2, 5, 32), AttentionMask()).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Attention(dim=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attend(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), AttentionMask(), backend="x")
