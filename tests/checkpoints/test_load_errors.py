"""Bad checkpoints give an lmstack error that names the problem and the file; nothing is unpickled."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.errors import CheckpointError, ConfigError, LmstackError
from lmstack.models import build_model
from lmstack.checkpoints import load_hf, save_hf


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save_hf(build_model("tiny-llama", seed=0), tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture
def ckpt(good_dir, tmp_path):
    return shutil.copytree(good_dir, tmp_path / "ckpt")


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such file or directory"):
        load_hf(tmp_path / "nowhere")


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_hf(ckpt)


def test_malformed_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_hf(ckpt)


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, model_type="mamba", architectures=["MambaForCausalLM"])
    with pytest.raises(ConfigError, match=r"config.json: unsupported model_type 'mamba'.*'gpt2', 'llama'"):
        load_hf(ckpt)


def test_invalid_config_value(ckpt):
    _edit_config(ckpt, num_attention_heads=3)
    with pytest.raises(ConfigError, match="config.json: n_heads=3 must be a multiple of n_kv_heads=2"):
        load_hf(ckpt)


def test_missing_required_config_key(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config.json: config.json has no 'hidden_size'"):
        load_hf(ckpt)


def test_unsupported_rope_type(ckpt):
    _edit_config(ckpt, rope_scaling={"rope_type": "longrope", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(ConfigError, match="unsupported rope_type 'longrope'"):
        load_hf(ckpt)


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf(ckpt)


def test_unexpected_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.0.extra.weight'\] in \['model.safetensors'\]"):
        load_hf(ckpt)


def test_shape_mismatch(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \[63\], but "
                                              r"config.json implies \[64\]"):
        load_hf(ckpt)


def test_truncated_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        load_hf(ckpt)


def test_corrupted_header(ckpt):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted safetensors header"):
        load_hf(ckpt)


def test_tiny_garbage_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        load_hf(ckpt)


def test_index_naming_a_missing_shard(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    weight_map = {"model.norm.weight": "model-00002-of-00002.safetensors"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: file not found"):
        load_hf(ckpt)


def test_pickle_checkpoints_are_refused_without_unpickling(ckpt, monkeypatch):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"pickle data that must never be loaded")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*\.bin checkpoints are not read"):
        load_hf(ckpt)


def test_integer_weights_are_rejected(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype I8"):
        load_hf(ckpt)


def test_all_errors_share_one_base_class():
    assert issubclass(CheckpointError, LmstackError) and issubclass(ConfigError, LmstackError)
