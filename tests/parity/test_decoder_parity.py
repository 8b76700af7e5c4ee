"""Decoder families against `transformers` on the same random weights: logits within 1e-4 (fp32),
20 greedy tokens identical, and save_hf output loading back into transformers with the same logits."""

import pytest
import torch

from lmstack.checkpoints import load_hf, save_hf
from lmstack.nn import set_attention_backend
from tests.parity.hf_reference import hf_logits, load_reference, make_hf_model, save_hf_model, transformers

ATOL = 1e-4
V = 96  # vocabulary of the tiny models


def _gpt2(**kw):
    base = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2Config(**{**base, **kw})


def _llama(**kw):
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**base, **kw})


def _mistral(**kw):
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=64, sliding_window=5)
    return transformers.MistralConfig(**{**base, **kw})


def _qwen2(**kw):
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.Qwen2Config(**{**base, **kw})


def _mixtral(**kw):
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralConfig(**{**base, **kw})


def _qwen2_moe(**kw):
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, shared_expert_intermediate_size=48)
    return transformers.Qwen2MoeConfig(**{**base, **kw})


def _qwen3(**kw):
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, head_dim=12, max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.Qwen3Config(**{**base, **kw})


def _qwen3_moe(**kw):
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, head_dim=12, max_position_embeddings=64, num_experts=6,
                num_experts_per_tok=3, moe_intermediate_size=16)
    return transformers.Qwen3MoeConfig(**{**base, **kw})


CASES = {
    "gpt2-tied": lambda: _gpt2(),
    "gpt2-untied-exact-gelu": lambda: _gpt2(tie_word_embeddings=False, activation_function="gelu", n_inner=80),
    "llama-gqa-untied-theta": lambda: _llama(rope_theta=500000.0, tie_word_embeddings=False),
    "llama-mqa-bias-headdim": lambda: _llama(num_key_value_heads=1, attention_bias=True, mlp_bias=True, head_dim=16),
    "llama-tied-mha": lambda: _llama(num_key_value_heads=6, tie_word_embeddings=True),
    "llama-rope-linear": lambda: _llama(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-rope-dynamic": lambda: _llama(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    # head_dim 32 gives wavelengths 6..60000: some below, some inside, some above the 16..64 band.
    "llama-rope-llama3": lambda: _llama(head_dim=32, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2-rope-yarn": lambda: _qwen2(rope_theta=20000.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-window": lambda: _mistral(),
    "mistral-no-window": lambda: _mistral(sliding_window=None),
    "qwen2-bias-tied": lambda: _qwen2(),
    "qwen2-window-some-layers": lambda: _qwen2(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                               max_window_layers=1, tie_word_embeddings=False),
    # Mixtures of experts: experts drawn apart (hf_reference.randomize_), so a swapped expert shows.
    "mixtral-top2": lambda: _mixtral(),
    "mixtral-top1-8-experts-window": lambda: _mixtral(num_local_experts=8, num_experts_per_tok=1, sliding_window=5),
    "qwen2moe-shared-dense-layer": lambda: _qwen2_moe(mlp_only_layers=[1]),
    "qwen2moe-normtopk-every-2nd": lambda: _qwen2_moe(norm_topk_prob=True, decoder_sparse_step=2,
                                                      tie_word_embeddings=True),
    # Qwen3: per-head q / k norms (drawn away from 1 by randomize_).
    "qwen3-bias-window-some-layers": lambda: _qwen3(num_hidden_layers=3, attention_bias=True, use_sliding_window=True,
                                                    sliding_window=4, max_window_layers=1),
    "qwen3moe-dense-layer-normtopk": lambda: _qwen3_moe(mlp_only_layers=[1], norm_topk_prob=True),
    "qwen3moe-window-untied": lambda: _qwen3_moe(use_sliding_window=True, sliding_window=5, tie_word_embeddings=False),
}


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):
    """(case name, reference model, lmstack model loaded from the reference's save_pretrained)."""
    ref = make_hf_model(CASES[request.param]())
    directory = save_hf_model(ref, tmp_path_factory.mktemp(request.param))
    return request.param, ref, load_hf(directory)


def test_logits_match(pair):
    name, ref, ours = pair
    # Dynamic RoPE only differs past max_position_embeddings (16): run longer than that.
    ids = torch.randint(0, V, (2, 24 if "dynamic" in name else 13))
    torch.testing.assert_close(ours(ids), hf_logits(ref, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "flash"])
def test_other_attention_backends_match(pair, backend):
    _, ref, ours = pair
    ids = torch.randint(0, V, (2, 11))
    set_attention_backend(ours, backend)
    try:
        torch.testing.assert_close(ours(ids), hf_logits(ref, ids), atol=ATOL, rtol=0)
    finally:
        set_attention_backend(ours, "sdpa")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches(pair, side):
    _, ref, ours = pair
    ids = torch.randint(0, V, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    lengths = [10, 6, 3]
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, : 10 - n] = 0
        else:
            mask[row, n:] = 0
    got, want = ours(ids, attention_mask=mask), hf_logits(ref, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    # Pad positions too: both sides give a fully hidden query row a zero attention output.
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_greedy_tokens_match(pair):
    """20 greedy tokens, recomputing the whole prefix each step (no cache: that is issue 3's test)."""
    _, ref, ours = pair
    ids = torch.randint(0, V, (1, 5))
    mine, theirs = ids.clone(), ids.clone()
    for _ in range(20):
        mine = torch.cat([mine, ours(mine)[:, -1:].argmax(-1)], dim=1)
        theirs = torch.cat([theirs, hf_logits(ref, theirs)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(mine, theirs)


def test_save_hf_loads_in_transformers(pair, tmp_path):
    _, ref, ours = pair
    save_hf(ours, tmp_path / "out")
    reloaded = load_reference(tmp_path / "out")
    assert type(reloaded).__name__ == type(ref).__name__
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(hf_logits(reloaded, ids), ours(ids), atol=ATOL, rtol=0)
