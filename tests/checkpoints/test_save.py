"""save_hf: sharding, dtype, atomic writes that never damage an earlier save, and bare base checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack import fileio
from lmstack.checkpoints import io as ckpt_io
from lmstack.errors import ConfigError
from lmstack.models import build_model
from lmstack.checkpoints import load_hf, save_hf

IDS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def _same_logits(a, b):
    with torch.no_grad():
        torch.testing.assert_close(a(IDS), b(IDS), atol=0, rtol=0)


def test_sharded_save_writes_an_index_and_round_trips(tmp_path):
    model = build_model("tiny-gpt2", seed=0).eval()
    save_hf(model, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    _same_logits(model, load_hf(tmp_path))


def test_resaving_unsharded_removes_stale_shards_and_keeps_other_files(tmp_path):
    model = build_model("tiny-llama", seed=0).eval()
    save_hf(model, tmp_path, max_shard_size="50KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    save_hf(model, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    _same_logits(model, load_hf(tmp_path))


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = build_model("tiny-llama", seed=0).eval()
    save_hf(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")  # the crash happens mid-write
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf(build_model("tiny-llama", seed=1), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, nothing changed
    _same_logits(old, load_hf(tmp_path))


def test_dtype_cast_on_save_and_dtype_choice_on_load(tmp_path):
    model = build_model("tiny-llama", seed=0).eval()
    save_hf(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    assert load_hf(tmp_path).embed_tokens.weight.dtype == torch.float32  # "auto" computes in fp32 on CPU
    assert load_hf(tmp_path, dtype="stored").embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        load_hf(tmp_path, dtype="float8")


def test_tied_checkpoint_loads_with_tied_weights(tmp_path):
    model = build_model("tiny-gpt2", seed=0)
    save_hf(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_hf(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_checkpoint_without_base_prefix_loads(tmp_path):
    """The original "gpt2" upload stores GPT2Model names ("h.0.attn...") without "transformer."."""
    model = build_model("tiny-gpt2", seed=0).eval()
    save_hf(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # a buffer old GPT-2 files carry; it must be ignored
    save_file(bare, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _same_logits(model, load_hf(tmp_path))


def test_config_that_a_family_cannot_express_is_refused(tmp_path):
    model = build_model(build_model("tiny-llama").config.replace(sliding_window=4, model_type="llama"))
    with pytest.raises(ConfigError, match=r"cannot save as a llama checkpoint: fields \['sliding_window'\]"):
        save_hf(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_writes_are_atomic_renames(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    save_hf(build_model("tiny-llama"), tmp_path)
    assert {os.path.basename(b) for _, b in renames} == {"model.safetensors", "config.json"}
    assert all(os.path.basename(a).startswith(".") and a.endswith(".tmp") for a, _ in renames)
