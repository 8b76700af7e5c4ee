"""Randomly drawn configurations per family (seeded): transformers saves, lmstack loads, logits agree,
and lmstack's save loads back in transformers with the same logits."""

import random

import pytest
import torch

from lmstack.checkpoints import load_hf, save_hf
from tests.parity.hf_reference import hf_logits, load_reference, make_hf_model, save_hf_model, transformers


def _rope(rng: random.Random, max_pos: int) -> dict:
    kind = rng.choice(["default", "linear", "dynamic", "llama3", "yarn"])
    if kind == "default":
        return {"rope_theta": rng.choice([10000.0, 1e6, 500.0])}
    scaling = {"rope_type": kind, "factor": rng.choice([2.0, 4.0, 8.0])}
    if kind == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=max_pos // 2)
    if kind == "yarn":
        scaling.update(original_max_position_embeddings=max_pos // 2)
    return {"rope_theta": rng.choice([10000.0, 500.0]), "rope_scaling": scaling}


def _llama_like(rng: random.Random, seed: int) -> dict:
    head_dim = rng.choice([4, 8, 16])
    n_kv = rng.choice([1, 2, 3])
    n_heads = n_kv * rng.choice([1, 2, 3])
    max_pos = rng.choice([16, 32, 64])
    return dict(vocab_size=rng.randint(40, 130), hidden_size=n_heads * head_dim * rng.choice([1, 2]),
                head_dim=head_dim, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                intermediate_size=rng.randint(16, 80), num_hidden_layers=rng.randint(1, 3),
                max_position_embeddings=max_pos, rms_norm_eps=rng.choice([1e-5, 1e-6]),
                tie_word_embeddings=seed % 2 == 0, hidden_act=rng.choice(["silu", "gelu"]), **_rope(rng, max_pos))


def draw(family: str, seed: int):
    rng = random.Random(f"{family}-{seed}")
    if family == "gpt2":
        n_head = rng.choice([1, 2, 4])
        return transformers.GPT2Config(
            vocab_size=rng.randint(40, 130), n_embd=n_head * rng.choice([8, 16]), n_head=n_head,
            n_layer=rng.randint(1, 3), n_positions=rng.choice([16, 48]), n_inner=rng.choice([None, 24, 72]),
            activation_function=rng.choice(["gelu_new", "gelu", "relu", "gelu_pytorch_tanh"]),
            layer_norm_epsilon=rng.choice([1e-5, 1e-6]), tie_word_embeddings=seed % 2 == 0)
    kw = _llama_like(rng, seed)
    if family == "llama":
        bias = rng.random() < 0.5
        return transformers.LlamaConfig(**kw, attention_bias=bias, mlp_bias=rng.random() < 0.5)
    if family == "mistral":
        return transformers.MistralConfig(**kw, sliding_window=rng.choice([None, 2, 3, 7]))
    n_layers = kw["num_hidden_layers"]
    # Odd seeds slide on the layers from max_window_layers on (at least the last one).
    return transformers.Qwen2Config(**kw, use_sliding_window=seed % 2 == 1, sliding_window=rng.choice([2, 5]),
                                    max_window_layers=rng.randint(0, n_layers - 1))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_random_config_round_trip(family, seed, tmp_path):
    config = draw(family, seed)
    ref = make_hf_model(config, seed=seed)
    ours = load_hf(save_hf_model(ref, tmp_path / "ref"))
    # Run past the trained context only where dynamic-NTK scaling is meant for it.
    context = getattr(config, "n_positions", None) or config.max_position_embeddings
    dynamic = (getattr(config, "rope_parameters", None) or {}).get("rope_type") == "dynamic"
    T = context + 5 if dynamic else min(context, 20)
    ids = torch.randint(0, config.vocab_size, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, : T // 3] = 0
    torch.testing.assert_close(ours(ids), hf_logits(ref, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours(ids, attention_mask=mask), hf_logits(ref, ids, mask), atol=1e-4, rtol=0)
    reloaded = load_reference(save_hf(ours, tmp_path / "ours"))
    torch.testing.assert_close(hf_logits(reloaded, ids, mask), hf_logits(ref, ids, mask), atol=1e-4, rtol=0)
