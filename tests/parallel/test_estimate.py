"""The memory and step-time model behind docs/parallel.md's worked plans (no processes)."""

import pytest

from lmstack.errors import ConfigError
from lmstack.parallel.estimate import LLAMA_7B, LLAMA_70B, ModelShape, estimate, state_bytes


def test_model_states_follow_the_zero_paper():
    """Rajbhandari et al. 2020, fig. 1 (Psi = 7.5B, N = 64, K = 12): 120 GB, 31.4 GB, 16.6 GB, 1.9 GB."""
    psi, n = 7.5e9, 64
    got = [state_bytes(psi, s, n) / 1e9 for s in ("ddp", "zero1", "zero2", "zero3")]
    assert got == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.06)
    assert state_bytes(psi, "zero3", 8, tp=8) == pytest.approx(16 * psi / 64)  # TP and FSDP both divide


def test_what_fits_on_80_gb():
    assert not estimate(LLAMA_7B, 8, strategy="ddp").fits  # 16P = 108 GB of states on every GPU
    assert estimate(LLAMA_7B, 8, strategy="zero3").fits
    assert not any(estimate(LLAMA_70B, 8, tp, s).fits for s in ("ddp", "zero1", "zero3") for tp in (1, 8))
    assert estimate(LLAMA_70B, 64, strategy="zero3", micro_batch=2).fits
    assert not estimate(LLAMA_7B, 8, checkpointing=False, micro_batch=32).fits  # 32 layers of full activations


def test_fsdp_traffic_per_compute_does_not_depend_on_the_model_size():
    """Both grow with P: what decides whether ZeRO-3's re-gathers hide behind compute is the tokens per
    micro-batch and the bandwidth, not the model."""
    small, large = (estimate(shape, 64, micro_batch=2) for shape in (LLAMA_7B, LLAMA_70B))
    assert small.data_parallel_s / small.compute_s == pytest.approx(large.data_parallel_s / large.compute_s)
    one, two = (estimate(LLAMA_70B, 64, micro_batch=m) for m in (1, 2))
    assert one.data_parallel_s == pytest.approx(2 * two.data_parallel_s)  # twice the micro-batches
    assert one.compute_s == pytest.approx(two.compute_s)
    inside, across = estimate(LLAMA_7B, 8), estimate(LLAMA_7B, 16)
    per_micro_batch = [e.data_parallel_s / e.micro_batches for e in (inside, across)]
    # 16 GPUs span two nodes: InfiniBand's 45 GB/s, not NVLink's 300; the ring moves (N - 1) / N of the bytes
    assert per_micro_batch[1] / per_micro_batch[0] == pytest.approx((15 / 16) / (7 / 8) * 300 / 45)


def test_the_step_is_compute_or_communication_plus_tensor_parallel_traffic():
    e = estimate(LLAMA_70B, 512, tp=8, strategy="zero1")
    assert e.step_s == pytest.approx(max(e.compute_s, e.data_parallel_s) + e.tensor_parallel_s)
    assert e.tensor_parallel_s > 0 and estimate(LLAMA_70B, 512, tp=1).tensor_parallel_s == 0


def test_impossible_layouts_are_named():
    with pytest.raises(ConfigError, match="tp=3 does not divide 8"):
        estimate(LLAMA_7B, 8, tp=3)
    with pytest.raises(ConfigError, match="spans nodes"):
        estimate(LLAMA_7B, 16, tp=16)
    with pytest.raises(ConfigError, match="cannot give 512 data-parallel groups"):
        estimate(ModelShape(1e9, 16, 2048), 512, global_batch_tokens=2**20)
    with pytest.raises(ConfigError, match="unknown strategy"):
        state_bytes(1e9, "zero4", 8)
