"""PEFT as transforms: loading with transforms (meta device), save_hf merging or refusing, QLoRA, merge /
unmerge / disable / remove, trainable-state checkpoints, encoders, and bad input."""

import functools

import pytest
import torch

from lmstack.checkpoints import load_hf, load_model, save_hf
from lmstack.checkpoints.train_state import TRAINABLE_FILE, load_checkpoint, save_checkpoint
from lmstack.compress import quantize_
from lmstack.errors import CheckpointError, ConfigError
from lmstack.models import build_model
from lmstack.models.presets import get_preset
from lmstack.nn.transforms import TransformError, added_tensor_names, base_state_dict
from lmstack.peft import (apply_ia3, apply_lora, disabled, load_adapter, merge_, remove_, save_adapter,
                          trainable_parameters, unmerge_)
from lmstack.peft import files as adapter_files
from lmstack.peft.apply import adapter_layers


def _llama():
    return build_model(get_preset("tiny-llama"), seed=0).eval()


@pytest.fixture()
def base_dir(tmp_path):
    return save_hf(_llama(), tmp_path / "base")


def _ids(n=10):
    return torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(1))


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_load_with_lora_on_meta_plans_only_base_tensors(base_dir):
    plain = load_hf(base_dir)
    model = load_model(base_dir, transforms=[functools.partial(apply_lora, rank=4, alpha=8, use_dora=True)])
    q = model.layers[0].attn.q_proj
    assert type(q).__name__ == "LoRALinear" and not q.lora_A.weight.is_meta
    assert q.lora_A.weight.abs().sum() > 0 and q.lora_B.weight.abs().sum() == 0  # B = 0: the model is unchanged
    torch.testing.assert_close(q.lora_magnitude_vector, q.weight.norm(dim=1))
    assert "layers.0.attn.q_proj.weight" in model.state_dict()  # base names unchanged
    assert added_tensor_names(model) == {f"layers.{i}.attn.{p}_proj.{t}" for i in range(2) for p in "qv"
                                         for t in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), plain(_ids()))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "layers.0.attn.q_proj.weight" in frozen and "embed_tokens.weight" in frozen
    count = trainable_parameters(model)
    # per layer: q (A 4x64, B 64x4, m 64) + v (A 4x64, B 32x4, m 32)
    assert count.trainable == 2 * ((256 + 256 + 64) + (256 + 128 + 32))
    assert "trainable%" in str(count) and 0 < count.fraction < 0.05


def test_save_hf_writes_merged_and_refuses_what_cannot_merge(base_dir, tmp_path):
    model = load_model(base_dir, transforms=[functools.partial(apply_lora, rank=4, targets=["q_proj", "down_proj"])])
    _randomize_adapters(model)
    with torch.no_grad():
        expected = model(_ids())
    save_hf(model, tmp_path / "merged")
    assert not any("lora" in n for n in load_hf(tmp_path / "merged").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "merged")(_ids()), expected, atol=1e-5, rtol=0)
    assert type(model.layers[0].attn.q_proj).__name__ == "LoRALinear"  # the live model keeps its adapter
    with pytest.raises(TransformError, match="layers.0.attn.q_proj carries a lora transform"):
        base_state_dict(model, merge=False)
    quantized = quantize_(load_hf(base_dir), "int8")
    with pytest.raises(TransformError, match="int8 quantization.*save_quantized"):
        save_hf(quantized, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_qlora_layer_math_gradients_and_merged_export(base_dir, tmp_path):
    transforms = [functools.partial(quantize_, scheme="nf4", lm_head=False),
                  functools.partial(apply_lora, rank=4, alpha=8, targets=["q_proj", "v_proj"])]
    model = load_model(base_dir, transforms=transforms).train()
    layer = model.layers[0].attn.q_proj
    assert type(layer).__name__ == "LoRAQuantizedLinear"
    _randomize_adapters(model)
    x = torch.randn(3, 11, 64, requires_grad=True)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    reference = x @ layer.dequantize().T + 2.0 * (x @ A.T) @ B.T
    grads = torch.autograd.grad(reference.square().sum(), (x, A, B))
    got = layer(x)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(torch.autograd.grad(got.square().sum(), (x, A, B)), grads):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)
    with pytest.raises(TransformError, match="quantized .QLoRA.*dequantize=True"):
        merge_(model)
    with pytest.raises(TransformError, match="nf4 quantization"):
        save_hf(model, tmp_path / "plain")  # k_proj is quantized without an adapter
    model.eval()
    with torch.no_grad():
        expected = model(_ids())
    save_hf(model, tmp_path / "merged", dequantize=True)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "merged")(_ids()), expected, atol=1e-4, rtol=0)


def test_merge_unmerge_disable_remove(base_dir):
    plain = load_hf(base_dir)
    model = apply_lora(load_hf(base_dir), rank=4, use_dora=True, targets=["q_proj", "v_proj", "o_proj"])
    apply_ia3(model, targets=["k_proj", "down_proj"], feedforward=["down_proj"])
    _randomize_adapters(model)
    ids = _ids()
    with torch.no_grad():
        adapted, base = model(ids), plain(ids)
        assert (adapted - base).abs().max() > 1e-2
        with disabled(model):
            torch.testing.assert_close(model(ids), base)
        merge_(model)
        torch.testing.assert_close(model(ids), adapted, atol=1e-4, rtol=0)
        with disabled(model):  # merged layers are taken out and put back
            torch.testing.assert_close(model(ids), base, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(ids), adapted, atol=1e-4, rtol=0)
        unmerge_(model)
        for (name, p), q in zip(plain.named_parameters(), [model.state_dict()[n] for n, _ in plain.named_parameters()]):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=name)
    remove_(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert type(model.layers[0].attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base, atol=1e-5, rtol=0)


def test_lora_and_ia3_on_an_encoder():
    encoder = build_model(get_preset("tiny-bert"), seed=0).eval()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        base = encoder(ids).hidden_states
    apply_lora(encoder, rank=2)  # the bert family's default targets: q_proj, v_proj
    with pytest.raises(ConfigError, match="already carry a lora transform"):
        apply_ia3(encoder)  # its defaults (k_proj, v_proj, fc_out) overlap
    apply_ia3(encoder, targets=["k_proj", "fc_out"])
    assert {n.rsplit(".", 1)[-1] for n in adapter_layers(encoder)} == {"q_proj", "v_proj", "k_proj", "fc_out"}
    _randomize_adapters(encoder)
    with torch.no_grad():
        adapted = encoder(ids).hidden_states
        assert (adapted - base).abs().max() > 1e-3
        merge_(encoder)
        torch.testing.assert_close(encoder(ids).hidden_states, adapted, atol=1e-5, rtol=0)


def test_qlora_classifier_adapter_saves_its_head_beside_quantized_codes(tmp_path):
    """An encoder task's QLoRA adapter: the trained head goes in as modules_to_save; the NF4 codes (buffers,
    without Hugging Face names) are neither saved nor in the way."""
    from lmstack.recipes.finetune import with_task_head
    from lmstack.recipes.finetune_lm import QLORA_KEEP

    def classifier():
        model = with_task_head(build_model(get_preset("tiny-bert"), seed=0), "sequence_classification", ("a", "b"),
                               True, 0)
        return quantize_(model, "nf4", lm_head=False, exclude=QLORA_KEEP)

    model = apply_lora(classifier(), rank=2, trainable=("classifier", "pooler"))
    _randomize_adapters(model)
    with torch.no_grad():
        model.classifier.proj.weight.add_(1.0)  # trained, so unlike a fresh head
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(classifier(), tmp_path / "adapter").eval()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=1e-6, rtol=0)
    assert loaded.classifier.proj.weight.requires_grad


def test_trainable_state_checkpoint_holds_only_the_adapter_and_resumes(base_dir, tmp_path):
    model = apply_lora(load_hf(base_dir), rank=4)
    _randomize_adapters(model)
    checkpoint = save_checkpoint(tmp_path / "run", 3, model, {"step": 3})
    assert sorted(p.name for p in checkpoint.iterdir()) == ["train_state.pt", TRAINABLE_FILE]
    assert (checkpoint / TRAINABLE_FILE).stat().st_size < 30_000  # 8 LoRA matrices, not the 0.5 MB base
    fresh = apply_lora(load_hf(base_dir), rank=4)
    assert load_checkpoint(checkpoint, fresh)["step"] == 3
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    other = apply_lora(load_hf(base_dir), rank=8)
    with pytest.raises(CheckpointError, match="other trainable parameters"):
        load_checkpoint(checkpoint, other)


def test_bad_input_is_a_clear_error(base_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"\['qq_proj'\] match no linear layer.*'q_proj'"):
        apply_lora(load_hf(base_dir), targets=["q_proj", "qq_proj"])
    for rank in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="rank must be a positive integer"):
            apply_lora(load_hf(base_dir), rank=rank)
    with pytest.raises(ConfigError, match=r"\['layers.0.attn.q_proj', .* already carry a lora transform"):
        apply_lora(apply_lora(load_hf(base_dir), rank=2), rank=2)
    model = apply_lora(load_hf(base_dir), rank=4)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "save_file", broken)
    _randomize_adapters(model, seed=1)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "adapter")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before  # no temporaries either
    wider = get_preset("tiny-llama").replace(dim=96)
    with pytest.raises(CheckpointError, match="has shape .* another base"):
        load_adapter(build_model(wider, seed=0), tmp_path / "adapter")
    gpt2 = build_model(get_preset("tiny-gpt2"), seed=0)
    with pytest.raises(CheckpointError, match="name no linear layer of this model"):
        load_adapter(gpt2, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="no such file"):
        load_adapter(_llama(), tmp_path)
    with pytest.raises(ConfigError, match="no PEFT adapter"):
        save_adapter(_llama(), tmp_path / "empty")
