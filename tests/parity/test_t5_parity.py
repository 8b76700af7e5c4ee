"""T5 against `transformers` on the same random weights: T5 v1.0 (ReLU, tied head with d_model**-0.5
scaling) and v1.1 (gated GELU, untied head), padded sources, logits within 1e-4 (fp32); greedy and beam
search token-identical to ``T5ForConditionalGeneration.generate``; save_hf output loading back."""

import pytest
import torch

from lmstack.generate import GenerationConfig, generate
from lmstack.checkpoints import load_hf, save_hf
from lmstack.models.encoder_decoder import EncoderDecoder
from tests.parity.hf_reference import randomize_, transformers

ATOL = 1e-4
V = 97
VARIANTS = {"v1.0": dict(feed_forward_proj="relu"),
            "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def _reference(variant: str, **kw):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=V, d_model=32, d_kv=12, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                   **{**VARIANTS[variant], **kw})
    model = randomize_(transformers.T5ForConditionalGeneration(config).eval())
    if variant == "v1.1":  # an lm_head of its own (transformers 5 ties it unless the file holds another)
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 0.2)
    return model


def _source():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, V, (3, 30), generator=g)  # long enough to reach the logarithmic buckets
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_t5_logits_match_transformers(tmp_path, variant):
    reference = _reference(variant, num_decoder_layers=3)
    reference.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert isinstance(model, EncoderDecoder)
    assert model.config.n_decoder_layers == 3
    assert (model.lm_head.weight is model.embed_tokens.weight) == (variant == "v1.0")
    ids, mask = _source()
    decoder_ids = torch.randint(2, V, (3, 25), generator=torch.Generator().manual_seed(3))
    decoder_ids[:, 0] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = model(ids, mask, decoder_ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    save_hf(model, tmp_path / "ours")
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                                   expected, atol=ATOL, rtol=0)


def test_cached_decoding_equals_teacher_forcing(tmp_path):
    _reference("v1.1").save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    ids, mask = _source()
    decoder_ids = torch.randint(2, V, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, mask, decoder_ids)
        cross = model.cross_kv(model.encode(ids, mask))
        cache = model.new_cache(3, 6)
        steps = [model.decode(decoder_ids[:, i:i + 1], cross, mask, cache) for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_t5_generate_matches_transformers(tmp_path, variant, beams):
    reference = _reference(variant)
    reference.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    ids, mask = _source()
    for eos in (1, 7):  # 7 is common among the random model's outputs, so some rows stop early
        got = generate(model, ids, GenerationConfig(max_new_tokens=12, num_beams=beams, eos_token_id=eos),
                       attention_mask=mask)
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=beams,
                                      do_sample=False, eos_token_id=eos)
        assert torch.equal(got, expected), (got, expected)
        assert bool((got[:, 0] == 0).all())  # decoder ids begin with the decoder start token
