"""The kernels' instruction set: AVX-512 VNNI where the CPU has it, AVX2 otherwise or when asked; both builds give
the exact integer dots of the int8-activation kernels (dynamic_kernels.h), so both equal the reference."""

import os
import subprocess
import sys
import textwrap

import pytest

from lmstack.errors import ConfigError
from lmstack.kernels import isa
from lmstack.kernels.quant_matmul import quant_kernels


def test_the_choice_follows_the_cpu_and_the_environment(monkeypatch):
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.delenv("LMSTACK_CPU_ISA", raising=False)
    assert isa.kernel_isa() == "avx2" and isa.isa_flags() == isa.AVX2_FLAGS
    monkeypatch.setenv("LMSTACK_CPU_ISA", "avx512-vnni")
    with pytest.raises(ConfigError, match="lacks AVX-512 VNNI"):
        isa.kernel_isa()
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}))
    assert isa.isa_flags() == isa.AVX2_FLAGS + isa.VNNI_FLAGS
    monkeypatch.setenv("LMSTACK_CPU_ISA", "AVX2")
    assert isa.kernel_isa() == "avx2"
    monkeypatch.delenv("LMSTACK_CPU_ISA")
    assert isa.kernel_isa() == "avx512-vnni"
    monkeypatch.setenv("LMSTACK_CPU_ISA", "sse")
    with pytest.raises(ConfigError, match="LMSTACK_CPU_ISA='sse'"):
        isa.kernel_isa()


def test_cpu_flags_are_read_from_proc_cpuinfo():
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    assert "avx2" in isa.cpu_flags() or quant_kernels() is None


_CHECK = textwrap.dedent("""
    import torch
    from torch import nn
    from lmstack.compress import QuantizedLinear
    from lmstack.kernels import isa
    from lmstack.kernels.quant_matmul import quant_kernels
    assert quant_kernels() is not None
    torch.manual_seed(0)
    worst = 0.0
    for scheme, group in (("int8", None), ("int8", 32), ("int4", 32), ("int4", 128)):
        layer = QuantizedLinear.from_linear(nn.Linear(576, 40), scheme, group, activations="int8")
        for rows in (1, 3, 8, 20):  # 20: a prompt (the VNNI build's integer GEMM; the AVX2 build's fp32 tiles)
            x = torch.randn(rows, 576) * torch.linspace(0.1, 4.0, 576)
            with torch.no_grad():
                worst = max(worst, (layer(x) - layer.reference_forward(x)).abs().max().item())
    layer = QuantizedLinear.from_linear(nn.Linear(576, 40), "nf4")  # fp32 activations: AVX2's or AVX-512's lookups
    for rows in (1, 3, 8):
        x = torch.randn(rows, 576)
        with torch.no_grad():
            worst = max(worst, (layer(x) - layer.reference_forward(x)).abs().max().item())
    print(isa.kernel_isa(), worst)
""")


@pytest.mark.skipif(quant_kernels() is None, reason="the quantized CPU kernels cannot be built here")
@pytest.mark.skipif(isa.kernel_isa() != "avx512-vnni", reason="this CPU has no AVX-512 VNNI: the AVX2 build is the one "
                    "every other test runs")
def test_the_avx2_build_equals_the_reference_on_a_vnni_machine():
    """The other tests run the VNNI build here; this one builds and checks the AVX2 one (~15 s to compile)."""
    env = {**os.environ, "LMSTACK_CPU_ISA": "avx2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    chosen, worst = out.stdout.split()
    assert chosen == "avx2" and float(worst) < 1e-4
