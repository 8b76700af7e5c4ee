"""GPTQ against llmcompressor 0.14.0.1's ``quantize_weight`` (REFERENCES.md, section 3): the same weight,
Hessian and static group scales / zero points give the same int4 weights, with and without activation
ordering, for two group sizes.

llmcompressor wants transformers 5.17, so it lives in a side folder (the Makefile installs it with
``--no-deps --target .venv/side/llmcompressor``) and runs in a subprocess. Its package ``__init__`` files
import its dataset tooling (``datasets``, not installed); the subprocess registers the three parent
packages as bare namespaces so that only ``gptq_quantize`` and its helpers are executed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIDE = ROOT / ".venv" / "side" / "llmcompressor"

SCRIPT = r"""
import json, os, sys, types
side = sys.argv[1]
sys.path.insert(0, side)
for name in ["llmcompressor", "llmcompressor.modifiers", "llmcompressor.modifiers.gptq"]:
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(side, *name.split("."))]
    sys.modules[name] = package
import torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from lmstack.compress import formats
from lmstack.compress.calibrated import gptq_int4

g = torch.Generator().manual_seed(0)
W = torch.randn(48, 128, generator=g)
X = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3.0, 128)  # uneven channels: ordering matters
H = 2 * X.T @ X / X.shape[0]
report = []
for actorder in [None, "weight"]:
    for group in [32, 64]:
        scales, zeros = formats.int4_params(W, group)
        args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group,
                                actorder=actorder)
        theirs, _, fallback = quantize_weight(W.clone()[None], H.clone()[None], scales[None], zeros[None], None,
                                              args, blocksize=32, percdamp=0.01)
        ours = formats.dequantize_int4(gptq_int4(W, H, group, block_size=32, act_order=actorder is not None), group)
        rtn = formats.dequantize_int4(formats.quantize_int4(W, group), group)
        report.append({"actorder": actorder, "group": group, "max_diff": (theirs[0] - ours).abs().max().item(),
                       "fallback": bool(fallback.any()), "differs_from_rtn": (ours - rtn).abs().max().item()})
print(json.dumps(report))
"""


def test_gptq_equals_llmcompressor():
    if not (SIDE / "llmcompressor").is_dir():
        pytest.skip(f"llmcompressor side folder missing: pip install --no-deps --target {SIDE} llmcompressor==0.14.0.1 "
                    f"compressed-tensors==0.19.0 loguru==0.7.3 (make setup does)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(SIDE)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 4
    for row in report:
        assert not row["fallback"], row
        assert row["differs_from_rtn"] > 0.1, row  # GPTQ moved codes: the comparison is not of two RTNs
        assert row["max_diff"] == 0.0, row
