"""generate() against transformers' generate on the same weights: greedy and beam search token-identical
(batched, left-padded, with EOS that really fires), and processors giving the same filtered scores."""

import pytest
import torch

from lmstack.generate import GenerationConfig, LogitsPipeline, generate, repetition_penalty, top_k_filter, \
    top_p_filter
from lmstack.checkpoints import load_hf
from lmstack.kernels import load_cpu_kernels, use_skinny_linears_
from tests.parity.hf_reference import make_hf_model, save_hf_model, transformers

V = 64
FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=64),
    "llama": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": lambda: transformers.MistralConfig(vocab_size=V, hidden_size=48, intermediate_size=96,
                                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                                  max_position_embeddings=64, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                              tie_word_embeddings=True),
    "mixtral": lambda: transformers.MixtralConfig(vocab_size=V, hidden_size=48, intermediate_size=40,
                                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                                  max_position_embeddings=64, num_local_experts=4),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(vocab_size=V, hidden_size=48, intermediate_size=96,
                                                     num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                                     max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=16, shared_expert_intermediate_size=48),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(vocab_size=V, hidden_size=48, intermediate_size=96,
                                                     num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                                     head_dim=8, max_position_embeddings=64, num_experts=4,
                                                     num_experts_per_tok=2, moe_intermediate_size=16,
                                                     norm_topk_prob=True),
}


@pytest.fixture(params=[(family, fused) for family in FAMILIES for fused in (False, True)],
                ids=lambda p: p[0] + ("-fused" if p[1] else ""), scope="module")
def pair(request, tmp_path_factory):
    """(transformers model, lmstack model); "-fused" runs lmstack with the CPU kernels, whose decode steps
    go through the fused C++ step (lmstack/kernels/fused_step.py)."""
    family, fused = request.param
    ref = make_hf_model(FAMILIES[family]())
    ours = load_hf(save_hf_model(ref, tmp_path_factory.mktemp(family)))
    if fused:
        if load_cpu_kernels() is None:
            pytest.skip("the CPU kernels cannot be built here")
        use_skinny_linears_(ours)
    return ref, ours


def _prompts():
    # Ids from 1: without an attention_mask transformers treats any pad id (0) in a prompt as padding,
    # while lmstack never guesses padding from token values.
    ids = torch.randint(1, V, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :5] = 0
    return ids, mask


def _frequent_token(ref, ids, mask) -> int:
    """A token the model generates mid-way for row 0, so using it as EOS ends rows at different steps."""
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    return int(out[0, ids.shape[1] + 3])


def _both(ref, ours, ids, mask, **options):
    theirs = ref.generate(ids, attention_mask=mask, do_sample=False, **options)
    mine = generate(ours, ids, GenerationConfig(**options), attention_mask=mask)
    return mine, theirs


@pytest.mark.parametrize("options", [
    dict(max_new_tokens=14),
    dict(max_new_tokens=14, min_new_tokens=6),
    dict(max_new_tokens=14, repetition_penalty=1.5),
], ids=["greedy", "min-new-tokens", "repetition-penalty"])
def test_greedy_token_identical(pair, options):
    ref, ours = pair
    ids, mask = _prompts()
    eos = _frequent_token(ref, ids, mask)
    mine, theirs = _both(ref, ours, ids, mask, eos_token_id=eos, pad_token_id=0, **options)
    assert torch.equal(mine, theirs)
    if "min_new_tokens" not in options and "repetition_penalty" not in options:
        assert (mine[0, ids.shape[1]:] == 0).any(), "EOS should have ended row 0 early"


@pytest.mark.parametrize("options", [
    dict(num_beams=3),
    dict(num_beams=4, num_return_sequences=3, length_penalty=0.0),
    dict(num_beams=3, length_penalty=2.0, early_stopping=True),
    dict(num_beams=3, length_penalty=1.5, early_stopping="never"),
    dict(num_beams=2, repetition_penalty=1.3, min_new_tokens=4),
], ids=["beam3", "return3-lp0", "early-stop", "never", "penalties"])
def test_beam_search_token_identical(pair, options):
    ref, ours = pair
    ids, mask = _prompts()
    if "repetition_penalty" in options:  # transformers 5 cannot combine it with a padded batch in beam search
        mask = None
    eos = _frequent_token(ref, ids, mask if mask is not None else torch.ones_like(ids))
    mine, theirs = _both(ref, ours, ids, mask, max_new_tokens=10, eos_token_id=[eos, 7], pad_token_id=0, **options)
    assert torch.equal(mine, theirs)


def test_no_eos_runs_to_max_new_tokens(pair):
    """eos_token_id=[] means no end-of-sequence token (None would inherit the model config's, e.g. Llama's 2)."""
    ref, ours = pair
    ids, mask = _prompts()
    theirs = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=9, eos_token_id=None,
                          pad_token_id=0)
    mine = generate(ours, ids, GenerationConfig(max_new_tokens=9, eos_token_id=[], pad_token_id=0), attention_mask=mask)
    assert torch.equal(mine, theirs) and mine.shape == (3, 16)


# --- processors --------------------------------------------------------------------------------------

def _scores():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 50, generator=g) * 3, torch.randint(0, 50, (4, 12), generator=g)


def test_repetition_penalty_matches(pair):
    scores, seen = _scores()
    want = transformers.RepetitionPenaltyLogitsProcessor(1.7)(seen, scores.clone())
    assert torch.equal(repetition_penalty(scores, seen, 1.7), want)


@pytest.mark.parametrize("k", [1, 5, 49, 80])
def test_top_k_matches(k):
    scores, seen = _scores()
    assert torch.equal(top_k_filter(scores, k), transformers.TopKLogitsWarper(k)(seen, scores.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_matches(p):
    scores, seen = _scores()
    assert torch.equal(top_p_filter(scores, p), transformers.TopPLogitsWarper(p)(seen, scores.clone()))


@pytest.mark.parametrize("options", [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=10),
    dict(temperature=0.8, top_k=20, top_p=0.8, repetition_penalty=1.2),
    dict(top_k=0, top_p=0.6),
])
def test_sampling_pipeline_matches_transformers_processors(options):
    scores, seen = _scores()
    config = GenerationConfig(do_sample=True, **options)
    chain = []
    if config.repetition_penalty != 1.0:
        chain.append(transformers.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.temperature != 1.0:
        chain.append(transformers.TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        chain.append(transformers.TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        chain.append(transformers.TopPLogitsWarper(config.top_p))
    want = transformers.LogitsProcessorList(chain)(seen, scores.clone())
    got = LogitsPipeline(config, prompt_length=seen.shape[1])(seen, scores)
    assert torch.equal(got, want)
    assert torch.equal(got.softmax(-1), want.softmax(-1))
