"""DecoderConfig validation: every bad value names its field."""

import pytest

from lmstack.errors import ConfigError
from lmstack.models import DecoderConfig, family_for_config

BASE = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64)


@pytest.mark.parametrize("changes, message", [
    (dict(n_kv_heads=3), "n_heads=4 must be a multiple of n_kv_heads=3"),
    (dict(dim=-1), "dim=-1 must be a positive integer"),
    (dict(n_layers=2.5), "n_layers=2.5 must be a positive integer"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
    (dict(activation="swish2"), "activation='swish2' is not one of"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(head_dim=7), "needs an even head_dim"),
    (dict(position="learned", rope_scaling={"kind": "linear", "factor": 2.0}), "rope_scaling is set but position"),
    (dict(sliding_window=4, sliding_window_layers=(0, 5)), "sliding_window_layers contains 5"),
])
def test_invalid_values_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DecoderConfig(**{**BASE, **changes})


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match="unknown DecoderConfig field 'n_layer'; did you mean 'n_layers'"):
        DecoderConfig.from_dict({**BASE, "n_layer": 2})


def test_defaults_and_window_per_layer():
    cfg = DecoderConfig(**BASE, sliding_window=8, sliding_window_layers=(1,))
    assert cfg.n_kv_heads == 4 and cfg.head_dim == 8
    assert [cfg.window_for_layer(i) for i in range(2)] == [None, 8]
    assert DecoderConfig.from_dict(cfg.to_dict()) == cfg


def test_family_is_inferred_from_the_math_when_model_type_is_unset():
    gpt2_like = DecoderConfig(**BASE, norm="layernorm", mlp="plain", activation="gelu_tanh", mlp_bias=True,
                              qkv_bias=True, out_bias=True, position="learned")
    assert family_for_config(gpt2_like).model_type == "gpt2"
    assert family_for_config(DecoderConfig(**BASE)).model_type == "llama"
    assert family_for_config(DecoderConfig(**BASE, sliding_window=4)).model_type == "mistral"
    assert family_for_config(DecoderConfig(**BASE, qkv_bias=True)).model_type == "qwen2"
    with pytest.raises(ConfigError, match="no Hugging Face family can express"):
        family_for_config(DecoderConfig(**BASE, position="alibi"))
