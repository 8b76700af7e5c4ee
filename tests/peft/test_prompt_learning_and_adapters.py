"""Bottleneck adapters against the paper's formula, prefix tuning against attention over [prefix; keys],
both prompt-learning methods through the decoding cache with padding, loading with them on the meta
device, files both ways, disable / remove, and bad input. (peft parity: tests/parity/test_peft_prompt_parity.py.)"""

import functools

import pytest
import torch
import torch.nn.functional as F

from lmstack.checkpoints import load_hf, load_model, save_hf
from lmstack.errors import CheckpointError, ConfigError
from lmstack.generate import GenerationConfig, generate
from lmstack.models import build_model
from lmstack.models.presets import get_preset
from lmstack.nn.attention import Attention
from lmstack.nn.kv_cache import PrefixKVCache
from lmstack.nn.masks import AttentionMask
from lmstack.nn.transforms import TransformError, added_tensor_names
from lmstack.peft import (apply_bottleneck, apply_lora, apply_prefix_tuning, apply_prompt_tuning, disabled,
                          load_adapter, merge_, remove_, save_adapter, trainable_parameters)
from lmstack.peft.apply import adapter_layers
from lmstack.peft.files import module_names_to_hf


def _model(name="tiny-llama", **changes):
    config = get_preset(name)
    return build_model(config.replace(**changes) if changes else config, seed=0).eval()


def _ids(n=10, rows=2):
    return torch.randint(0, 512, (rows, n), generator=torch.Generator().manual_seed(1))


def _randomize(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(scale * torch.randn(p.shape, generator=g))


def _adapter(down, up, y):
    """The paper's adapter: y + W_up relu(W_down y + b_down) + b_up."""
    return y + F.linear(F.relu(F.linear(y, down.weight, down.bias)), up.weight, up.bias)


def test_bottleneck_adapter_is_the_paper_formula_inside_each_residual_branch():
    model = _model(n_layers=1)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    reference = _model(n_layers=1)
    apply_bottleneck(model, size=8)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), reference(_ids()), atol=0, rtol=0)  # up = 0: unchanged at start
    _randomize(model)
    block, plain = model.layers[0], reference.layers[0]
    assert type(block.attn).__name__ == "BottleneckAttention" and block.attn.q_proj.weight is not None
    mask = AttentionMask(causal=True)
    rotary = reference.rotary(torch.arange(7).expand(2, 7))
    with torch.no_grad():
        a = plain.attn(plain.attn_norm(x), mask, rotary)  # the sub-layers' own outputs (shared base weights)
        h = x + _adapter(block.attn.adapter_down, block.attn.adapter_up, a)
        m = plain.mlp(plain.mlp_norm(h))
        expected = h + _adapter(block.mlp.adapter_down, block.mlp.adapter_up, m)
        torch.testing.assert_close(block(x, mask, rotary), expected, atol=1e-6, rtol=0)
    counts = trainable_parameters(model)
    assert counts.trainable == 2 * (64 * 8 + 8 + 8 * 64 + 64)


def test_bottleneck_adapters_on_an_encoder_sit_before_the_post_norm():
    model, reference = _model("tiny-bert", n_layers=1), _model("tiny-bert", n_layers=1)
    apply_bottleneck(model, size=4)
    _randomize(model)
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    block, plain = model.layers[0], reference.layers[0]
    mask = AttentionMask(causal=False)
    with torch.no_grad():
        h = plain.attn_norm(x + _adapter(block.attn.adapter_down, block.attn.adapter_up, plain.attn(x, mask)))
        expected = plain.mlp_norm(h + _adapter(block.mlp.adapter_down, block.mlp.adapter_up, plain.mlp(h)))
        torch.testing.assert_close(block(x, mask), expected, atol=1e-6, rtol=0)


def test_prefix_cache_is_attention_over_prefix_and_keys():
    attn = Attention(32, 4, 2).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 32, generator=g)
    pk, pv = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    with torch.no_grad():
        got = attn(x, AttentionMask(causal=False), kv_cache=PrefixKVCache([(pk, pv)]))
        q = attn.q_proj(x).view(2, 6, 4, 8).transpose(1, 2)
        k, v = attn.project_kv(x)
        k = torch.cat([pk, k], 2).repeat_interleave(2, 1)
        v = torch.cat([pv, v], 2).repeat_interleave(2, 1)
        weights = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, -1)
        expected = attn.o_proj((weights @ v).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-bert"])
def test_padding_hides_pads_but_never_the_virtual_tokens(method, kind):
    model = _model(kind)
    (apply_prefix_tuning if method == "prefix" else apply_prompt_tuning)(model, 4)
    ids = _ids(8, rows=1)
    full = model(ids) if kind == "tiny-llama" else model(ids).hidden_states
    # Right-padded (encoder) / left-padded (decoder) copies give the same states for the real tokens.
    pads = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        if kind == "tiny-llama":
            padded = torch.cat([pads, ids], 1)
            mask = torch.cat([pads, torch.ones_like(ids)], 1)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            got = model(padded, attention_mask=mask, position_ids=positions)[:, 3:]
        else:
            padded, mask = torch.cat([ids, pads], 1), torch.cat([torch.ones_like(ids), pads], 1)
            got = model(padded, mask).hidden_states[:, :8]
    torch.testing.assert_close(got, full.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_greedy_decoding_on_the_cache_equals_recomputing_and_handles_left_padding(method):
    model = _model()
    (apply_prefix_tuning if method == "prefix" else apply_prompt_tuning)(model, 5)
    with torch.no_grad():
        model.get_submodule("prefix_encoder.embedding" if method == "prefix" else "prompt_embeddings").weight.mul_(3)
    ids = _ids(6)
    recomputed = ids
    for _ in range(5):
        with torch.no_grad():
            recomputed = torch.cat([recomputed, model(recomputed)[:, -1:].argmax(-1)], 1)
    assert torch.equal(generate(model, ids, GenerationConfig(max_new_tokens=5)), recomputed)
    # Beam search reorders the cache rows, prefix slots included.
    beams = generate(model, ids, GenerationConfig(max_new_tokens=4, num_beams=3))
    assert beams.shape == (2, 10)
    # A left-padded batch: each row as it would decode alone.
    short = ids[1:, 2:]
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    together = generate(model, batch, GenerationConfig(max_new_tokens=4), attention_mask=mask)
    alone = generate(model, short, GenerationConfig(max_new_tokens=4))
    assert torch.equal(together[1, 2:], alone[0])


@pytest.mark.parametrize("method", ["prefix", "prompt", "adapter"])
def test_load_model_applies_them_on_the_meta_device_and_files_round_trip(tmp_path, method):
    base_dir = save_hf(_model(), tmp_path / "base")
    transform = {"prefix": functools.partial(apply_prefix_tuning, num_virtual_tokens=4, projection=16),
                 "prompt": functools.partial(apply_prompt_tuning, num_virtual_tokens=4, init_token_ids=[5, 6, 7]),
                 "adapter": functools.partial(apply_bottleneck, size=8)}[method]
    model = load_model(base_dir, transforms=[transform]).eval()
    assert not any(p.is_meta for p in model.parameters())
    assert added_tensor_names(model) and all(not name.startswith("layers.0.attn.q_proj.") for name in
                                             added_tensor_names(model))
    if method == "prompt":  # text initialisation: the tokens' embeddings, repeated to length
        torch.testing.assert_close(model.prompt_embeddings.weight, model.embed_tokens.weight[[5, 6, 7, 5]])
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
        with disabled(model):
            torch.testing.assert_close(model(ids), load_hf(base_dir)(ids), atol=0, rtol=0)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(load_hf(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected, atol=1e-6, rtol=0)
    # Not mergeable: merge_ and save_hf say so and write nothing; remove_ gives the plain model back.
    with pytest.raises(TransformError, match="cannot be merged|not linear"):
        merge_(model)
    with pytest.raises(TransformError, match="prefix tuning|prompt tuning|bottleneck adapter"):
        save_hf(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    remove_(model)
    assert type(model).__name__ == "Decoder" and not adapter_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), load_hf(base_dir)(ids), atol=0, rtol=0)


def test_lora_still_finds_the_projections_beside_bottleneck_adapters():
    model = apply_bottleneck(_model(), size=4)
    apply_lora(model, targets=["q_proj", "v_proj"], rank=2)
    assert "layers.0.attn.adapter_down" not in module_names_to_hf(model)
    assert {type(m).__name__ for m in adapter_layers(model).values()} >= {"LoRALinear", "BottleneckAttention"}
    with pytest.raises(ConfigError, match="mixes"):
        save_adapter(model, "unused")


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="leave no room in the model's context of 256"):
        apply_prefix_tuning(_model(), 256)
    with pytest.raises(ConfigError, match="positive integer"):
        apply_prompt_tuning(_model(), 0)
    with pytest.raises(ConfigError, match=r"in \[0, 512\)"):
        apply_prompt_tuning(_model(), 4, init_token_ids=[600])
    with pytest.raises(ConfigError, match="Decoder or an Encoder"):
        apply_prefix_tuning(_model("tiny-t5"), 4)
    with pytest.raises(ConfigError, match="size must be a positive integer"):
        apply_bottleneck(_model(), size=0)
    with pytest.raises(ConfigError, match="name no sub-layer"):
        apply_bottleneck(_model(), targets=["nope"])
    model = apply_prefix_tuning(_model(), 16)
    with pytest.raises(ConfigError, match="already carries"):
        apply_prompt_tuning(model, 4)
    with pytest.raises(ValueError, match=r"16 virtual tokens \(prefix tuning\) \+ 250 tokens = 266 exceed"):
        model(torch.zeros(1, 250, dtype=torch.long))
    # An adapter for another base: other widths or depths are named, and nothing stays half-applied.
    save_adapter(model, tmp_path / "prefix")
    other = _model(n_layers=3)
    with pytest.raises(CheckpointError, match="another base"):
        load_adapter(other, tmp_path / "prefix")
    assert type(other).__name__ == "Decoder"
    save_adapter(apply_bottleneck(_model(), size=4), tmp_path / "bottleneck")
    with pytest.raises(CheckpointError, match="another base"):
        load_adapter(_model(dim=96, n_heads=4), tmp_path / "bottleneck")
