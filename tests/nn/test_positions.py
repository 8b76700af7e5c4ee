"""Positional encodings against explicit formulas and against transformers' RoPE / ALiBi functions."""

import math

import pytest
import torch

from lmstack.nn import LearnedPositions, RopeScaling, RotaryEmbedding, SinusoidalPositions, alibi_slopes, apply_rotary


def test_rope_is_a_complex_rotation_of_half_pairs():
    """Rotate-half RoPE turns pair (x_i, x_{i+D/2}) by angle position * theta^(-2i/D)."""
    D, theta = 16, 10000.0
    x = torch.randn(1, 1, 5, D)
    positions = torch.arange(5)[None]
    cos, sin = RotaryEmbedding(D, theta)(positions)
    got = apply_rotary(x, cos, sin)
    freqs = theta ** (-torch.arange(0, D, 2).float() / D)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(torch.ones(5, D // 2), positions[0, :, None] * freqs)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-4)


SCALINGS = {
    "linear": (RopeScaling("linear", 4.0), {"rope_type": "linear", "factor": 4.0}),
    "dynamic": (RopeScaling("dynamic", 2.0), {"rope_type": "dynamic", "factor": 2.0}),
    "llama3": (RopeScaling("llama3", 8.0, original_max_positions=64, low_freq_factor=1.0, high_freq_factor=4.0),
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}),
    "yarn": (RopeScaling("yarn", 4.0, original_max_positions=32),
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "yarn-beta-attn": (RopeScaling("yarn", 8.0, original_max_positions=16, beta_fast=16.0, beta_slow=2.0,
                                   attention_factor=0.9, truncate=False),
                       {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16.0,
                        "beta_slow": 2.0, "attention_factor": 0.9, "truncate": False}),
}


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rope_scaling_frequencies_match_transformers(kind):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours, theirs = SCALINGS[kind]
    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=32,
                                      rope_theta=50000.0, rope_scaling=theirs)
    seq_len = 80  # beyond max_position_embeddings, where dynamic scaling starts
    want, want_scale = ROPE_INIT_FUNCTIONS[theirs["rope_type"]](config, "cpu", seq_len=seq_len)
    got = RotaryEmbedding(32, 50000.0, ours, max_positions=32).inv_freq(seq_len)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert ours.cos_sin_scale == pytest.approx(want_scale, rel=1e-7)


def test_dynamic_scaling_is_inactive_within_the_trained_context():
    plain = RotaryEmbedding(32, 10000.0, max_positions=32).inv_freq(32)
    dynamic = RotaryEmbedding(32, 10000.0, RopeScaling("dynamic", 4.0), max_positions=32)
    assert torch.equal(dynamic.inv_freq(32), plain)
    assert not torch.equal(dynamic.inv_freq(33), plain)


def test_sinusoidal_matches_the_paper_formula():
    dim = 8
    pe = SinusoidalPositions(dim)(torch.arange(6)[None])[0]
    for pos in range(6):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_learned_positions_reject_positions_past_the_table():
    table = LearnedPositions(4, 8)
    assert table(torch.arange(4)[None]).shape == (1, 4, 8)
    with pytest.raises(ValueError, match="beyond the 4 learned positions"):
        table(torch.arange(5)[None])


def test_alibi_slopes_power_of_two():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


@pytest.mark.parametrize("n_heads", [4, 6, 12, 16])
def test_alibi_slopes_match_bloom(n_heads):
    pytest.importorskip("transformers")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # BLOOM's alibi is slope * position for an all-ones mask; position 1 reads off the slope.
    alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), n_heads, torch.float32)
    torch.testing.assert_close(alibi_slopes(n_heads), alibi[:, 0, 1], rtol=1e-6, atol=0)


def test_rope_scaling_validation():
    with pytest.raises(ValueError, match="original_max_positions"):
        RopeScaling("llama3", 8.0)
    with pytest.raises(ValueError, match="not supported"):
        RopeScaling("longrope", 2.0)
    with pytest.raises(ValueError, match="'yarn' needs original_max_positions"):
        RopeScaling("yarn", 2.0)
