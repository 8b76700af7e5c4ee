"""LoRA, rsLoRA, DoRA and IA3 against peft 0.21.2 on the same tiny Llama: adapter files both ways, forward
outputs, merged weights and adapter gradients (REFERENCES.md section 1)."""

import pytest
import torch

from lmstack.checkpoints import load_hf, save_hf
from lmstack.peft import apply_ia3, apply_lora, load_adapter, merge_, save_adapter
from lmstack.peft.apply import adapter_layers
from lmstack.peft.files import PREFIX, module_names_to_hf

from tests.parity.hf_reference import hf_logits, load_reference, tiny_gqa_llama_dir

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]
METHODS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS),
    "rslora": dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS, use_dora=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_gqa_llama_dir(tmp_path_factory)


def _ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _peft_model(base_dir, method: str):
    """A peft model with every adapter tensor non-zero (init_lora_weights=False, DoRA magnitudes rescaled)."""
    torch.manual_seed(3)
    base = load_reference(base_dir)
    if method == "ia3":
        config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        config = peft.LoraConfig(lora_dropout=0.0, init_lora_weights=False, **METHODS[method])
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.uniform_(0.5, 1.5)
            if "lora_magnitude_vector" in name:
                param.mul_(torch.linspace(0.5, 1.5, param.shape[0]))
    return model.eval()


def _saved_by_peft_loaded_by_lmstack(base_dir, tmp_path, method: str):
    """(peft's model, lmstack's base with the adapter peft saved from it)."""
    reference = _peft_model(base_dir, method)
    reference.save_pretrained(tmp_path / "adapter")
    return reference, load_adapter(load_hf(base_dir), tmp_path / "adapter")


@pytest.mark.parametrize("method", [*METHODS, "ia3"])
def test_peft_adapter_loads_with_equal_logits_and_gradients(base_dir, tmp_path, method):
    reference, ours = _saved_by_peft_loaded_by_lmstack(base_dir, tmp_path, method)
    ids = _ids()
    expected = hf_logits(reference, ids)
    torch.testing.assert_close(ours(ids), ours(ids))  # deterministic
    with torch.no_grad():
        got = ours(ids)
    assert (expected - hf_logits(load_reference(base_dir), ids)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Gradients of the adapter tensors, by peft's saved names.
    reference.train(), ours.train()
    reference(input_ids=ids).logits.square().mean().backward()
    ours(ids).square().mean().backward()
    theirs = {n.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
              for n, p in reference.named_parameters() if p.requires_grad}
    mine = _adapter_grads(ours)
    assert set(mine) == set(theirs) and mine
    for key, grad in mine.items():
        torch.testing.assert_close(grad, theirs[key].reshape(grad.shape), atol=1e-5, rtol=1e-4, msg=key)


def _adapter_grads(model):
    """peft's saved key -> gradient, for every adapter tensor of ``model``."""
    to_hf = module_names_to_hf(model)
    return {f"{PREFIX}{to_hf[name]}.{local}": p.grad for name, layer in adapter_layers(model).items()
            for local, p in layer.adapter_parameters().items()}


@pytest.mark.parametrize("method", [*METHODS, "ia3"])
def test_lmstack_adapter_loads_in_peft(base_dir, tmp_path, method):
    torch.manual_seed(5)
    ours = load_hf(base_dir)
    if method == "ia3":
        apply_ia3(ours, targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])
    else:
        spec = METHODS[method]
        apply_lora(ours, targets=LORA_TARGETS, rank=spec["r"], alpha=spec["lora_alpha"],
                   use_rslora=spec.get("use_rslora", False), use_dora=spec.get("use_dora", False))
    with torch.no_grad():  # non-zero everywhere (B starts at zero, IA3 at ones)
        for layer in adapter_layers(ours).values():
            for param in layer.adapter_parameters().values():
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5)).add_(0.05 * torch.randn_like(param))
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_reference(base_dir), tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(theirs, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", [*METHODS, "ia3"])
def test_merged_weights_equal_peft_and_load_in_transformers(base_dir, tmp_path, method):
    reference, ours = _saved_by_peft_loaded_by_lmstack(base_dir, tmp_path, method)
    ids = _ids()
    with torch.no_grad():
        unmerged = ours(ids)
    save_hf(ours, tmp_path / "merged")  # written merged; ours keeps its adapters
    merged_reference = reference.merge_and_unload()
    merge_(ours)
    hf_state = merged_reference.state_dict()
    for name, module in adapter_layers(ours).items():
        hf_name = _hf_module(ours, name) + ".weight"
        torch.testing.assert_close(module.weight, hf_state[hf_name], atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # a merged weight rounds differently from W x + s B A x: 1e-4 on logits of size ~10
        torch.testing.assert_close(ours(ids), unmerged, atol=1e-4, rtol=0)
        torch.testing.assert_close(hf_logits(load_reference(tmp_path / "merged"), ids), unmerged, atol=1e-4, rtol=0)


def _hf_module(model, name):
    return module_names_to_hf(model)[name]
