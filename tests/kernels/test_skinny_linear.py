"""SkinnyLinear (the decoding kernel) equals F.linear; the transform keeps names, ties and tokens."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmstack.generate import GenerationConfig, generate
from lmstack.models import build_model
from lmstack.nn.memory import hugepage_tensors, in_hugepages
from lmstack.kernels import SkinnyLinear, load_cpu_kernels, use_skinny_linears_


def test_kernel_builds_where_a_compiler_exists():
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: SkinnyLinear falls back to F.linear")
    assert load_cpu_kernels() is not None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(rows, bias):
    linear = torch.nn.Linear(77, 45, bias=bias)  # odd sizes exercise the remainder loops
    x = torch.randn(rows, 77)
    with torch.no_grad():
        torch.testing.assert_close(SkinnyLinear(linear)(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [9, 13, 16, 31, 64])
def test_the_tiled_kernel_for_9_to_64_rows_matches_f_linear(rows):
    """The medium kernel itself (called directly: SkinnyLinear picks it only where it beats BLAS), with odd
    widths and a ragged last 8-row chunk and 16-row tile."""
    if load_cpu_kernels() is None:
        pytest.skip("no kernels on this machine")
    weight, bias, x = torch.randn(37, 77), torch.randn(37), torch.randn(rows, 77)
    torch.testing.assert_close(load_cpu_kernels().skinny_linear(x, weight, bias), F.linear(x, weight, bias),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="1 to 64 rows"):
        load_cpu_kernels().skinny_linear(torch.randn(65, 77), weight, bias)


def test_three_dimensional_input_and_training_fallback():
    linear = torch.nn.Linear(32, 16)
    skinny = SkinnyLinear(linear)
    x = torch.randn(2, 1, 32, requires_grad=True)
    out = skinny(x)  # grad needed: F.linear path
    out.sum().backward()
    assert x.grad is not None and linear.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(skinny(x), linear(x), atol=1e-5, rtol=1e-5)


def test_transform_keeps_state_dict_ties_and_uses_huge_pages():
    model = build_model("tiny-gpt2", seed=0).eval()
    names = list(model.state_dict())
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        before = model(ids)
        use_skinny_linears_(model)
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == names
    assert model.lm_head.weight is model.embed_tokens.weight
    assert isinstance(model.layers[0].attn.q_proj, SkinnyLinear)
    weights = [m.weight for m in model.modules() if isinstance(m, SkinnyLinear)]
    assert all(in_hugepages(w) and w.data_ptr() % 4096 == 0 for w in weights)
    pointer = min(w.data_ptr() for w in weights)
    assert pointer % (2 * 2**20) == 0  # the arena is 2 MiB aligned
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and re.search(r"\[(madvise|always)\]", thp.read_text()):
        assert _huge_page_kib(pointer) > 0, "the weight arena should be backed by transparent huge pages"


def test_weights_already_in_huge_pages_are_not_copied_again():
    model = build_model("tiny-llama", seed=0).eval()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.no_grad():
        for linear, place in zip(linears, hugepage_tensors([tuple(m.weight.shape) for m in linears])):
            linear.weight.data = place.copy_(linear.weight)
    pointers = [m.weight.data_ptr() for m in linears]
    use_skinny_linears_(model)
    assert [m.weight.data_ptr() for m in model.modules() if isinstance(m, SkinnyLinear)] == pointers


def _huge_page_kib(pointer: int) -> int:
    """AnonHugePages (KiB) of the mapping holding ``pointer``, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= pointer < int(span[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_generation_is_unchanged_by_the_kernel():
    model = build_model("tiny-llama", seed=0).eval()
    ids = torch.randint(0, 512, (3, 5))
    config = GenerationConfig(max_new_tokens=12, eos_token_id=[])
    plain = generate(model, ids, config)
    beams = generate(model, ids, GenerationConfig(max_new_tokens=8, num_beams=3, eos_token_id=[]))
    use_skinny_linears_(model)
    assert torch.equal(generate(model, ids, config), plain)
    assert torch.equal(generate(model, ids, GenerationConfig(max_new_tokens=8, num_beams=3, eos_token_id=[])), beams)
