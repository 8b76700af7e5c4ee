"""The decoder: shapes, causality for every position kind, tied weights, meta build, KV-cached decoding."""

import pytest
import torch

from lmstack.models import Decoder, DecoderConfig, build_model
from lmstack.nn import StaticKVCache, set_attention_backend


def tiny(**kw) -> DecoderConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    return DecoderConfig(**{**base, **kw})


POSITION_KINDS = {
    "rope": tiny(),
    "learned": tiny(position="learned", norm="layernorm", mlp="plain", activation="gelu_tanh"),
    "sinusoidal": tiny(position="sinusoidal"),
    "alibi": tiny(position="alibi"),
    "none": tiny(position="none"),
    "window": tiny(sliding_window=3),
}


@pytest.mark.parametrize("kind", list(POSITION_KINDS))
def test_logits_shape_and_causality(kind):
    model = Decoder(POSITION_KINDS[kind]).eval()
    ids = torch.randint(0, 64, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 64)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 64
    # Changing tokens 6.. must not change any logit before position 6.
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


def test_tied_embeddings_share_one_matrix():
    model = Decoder(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = Decoder(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() == model.num_parameters() + 64 * 32


def test_meta_build_holds_no_memory():
    with torch.device("meta"):
        model = Decoder(tiny())
    assert all(p.is_meta for p in model.parameters())


def test_residual_projections_get_scaled_init():
    model = build_model(tiny(n_layers=8, dim=256, ffn_dim=512), seed=0)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


def test_bad_inputs_are_named():
    model = Decoder(tiny())
    with pytest.raises(ValueError, match="exceeds the context length max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        model(torch.zeros(33, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


def _decode_with_cache(model, ids, mask, backend):
    """Prefill 5 tokens, then feed the rest one at a time through a static cache."""
    set_attention_backend(model, backend)
    B, T = ids.shape
    cache = StaticKVCache.for_model(model, B, T)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    steps = [model(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], kv_cache=cache)]
    for t in range(5, T):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                           kv_cache=cache))
    assert cache.length == T
    return torch.cat(steps, dim=1), positions


@pytest.mark.parametrize("kind", ["rope", "learned", "alibi", "window"])
@pytest.mark.parametrize("backend", ["sdpa", "eager", "flash"])
def test_cached_decoding_equals_full_forward(kind, backend):
    model = Decoder(POSITION_KINDS[kind]).eval()
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad():
        cached, positions = _decode_with_cache(model, ids, mask, backend)
        full = model(ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=0)


def test_cache_overflow_and_reorder():
    model = Decoder(tiny()).eval()
    cache = StaticKVCache.for_model(model, batch_size=2, max_len=4)
    model(torch.zeros(2, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    before = cache.k[:, 1].clone()
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.k[:, 0], before) and torch.equal(cache.k[:, 1], before)
