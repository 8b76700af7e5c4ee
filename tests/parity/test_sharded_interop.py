"""Sharded checkpoints cross between transformers and lmstack in both directions."""

import json

import torch

from lmstack.checkpoints import load_hf, save_hf
from tests.parity.hf_reference import hf_logits, load_reference, make_hf_model, save_hf_model, transformers


def _llama():
    return make_hf_model(transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96,
                                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2))


def test_transformers_sharded_save_loads_in_lmstack(tmp_path):
    ref = _llama()
    save_hf_model(ref, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 96, (2, 8))
    torch.testing.assert_close(load_hf(tmp_path)(ids), hf_logits(ref, ids), atol=1e-4, rtol=0)


def test_lmstack_sharded_save_loads_in_transformers(tmp_path):
    ref = _llama()
    save_hf_model(ref, tmp_path / "ref")
    ours = load_hf(tmp_path / "ref")
    save_hf(ours, tmp_path / "out", max_shard_size="20KB")
    assert len(set(json.loads((tmp_path / "out/model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    ids = torch.randint(0, 96, (2, 8))
    torch.testing.assert_close(hf_logits(load_reference(tmp_path / "out"), ids), ours(ids), atol=1e-4, rtol=0)
