"""2:4 semi-structured storage: the packing round-trips, the CPU kernel equals unpack-then-matmul, the fused
decode step over packed layers equals the dense model, saving writes the dense zeros, and a weight that is not
2:4 sparse is refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress import prune_
from lmstack.compress.prune import nm_mask
from lmstack.compress.semi_sparse import SemiSparseLinear, is_2of4, pack_2of4, semi_sparse_, unpack_2of4
from lmstack.errors import ConfigError
from lmstack.kernels.quant_matmul import quant_kernels
from lmstack.models import DecoderConfig, build_model

needs_kernels = pytest.mark.skipif(quant_kernels() is None, reason="the CPU kernels cannot be built here")
TINY = DecoderConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


def _two_four(out=48, width=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g)
    w = w * nm_mask(w.abs(), 2, 4)
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # a group holding one nonzero
    w[1, 4:8] = 0.0  # and one holding none
    return w


def test_packing_round_trips_and_halves_the_values():
    w = _two_four()
    values, codes = pack_2of4(w)
    assert values.shape == (48, 48) and codes.shape == (48, 12) and codes.dtype == torch.uint8
    assert torch.equal(unpack_2of4(values, codes), w)
    assert (values.numel() * 4 + codes.numel()) / (w.numel() * 4) == pytest.approx(0.53125)


def test_a_weight_that_is_not_two_four_is_refused():
    w = _two_four()
    w[3, 8:12] = 1.0
    assert not is_2of4(w)
    with pytest.raises(ConfigError, match="row 3, inputs 8-11 hold 4 nonzeros"):
        pack_2of4(w)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_kernel_equals_unpack_then_matmul(rows):
    linear = nn.Linear(96, 48)
    with torch.no_grad():
        linear.weight.copy_(_two_four())
    packed = SemiSparseLinear(linear)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # training shapes take the reference path
        torch.testing.assert_close(packed(torch.randn(2, 9, 96)).shape, torch.Size([2, 9, 48]))


@needs_kernels
def test_fused_decode_step_over_two_four_layers_equals_the_dense_model():
    from lmstack.kernels import load_cpu_kernels, use_skinny_linears_
    from lmstack.kernels.fused_step import FusedDecodeStep, fused_step_blocker
    from lmstack.nn.kv_cache import StaticKVCache

    if load_cpu_kernels() is None:
        pytest.skip("the fused step cannot be built here")
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    prune_(model, "magnitude", pattern="2:4")
    reference = copy.deepcopy(model)
    swapped = semi_sparse_(model)
    assert len(swapped) == 2 * 7 and "lm_head" not in swapped
    use_skinny_linears_(model, hugepages=False)
    assert fused_step_blocker(model, 1) is None
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    caches = [StaticKVCache.for_model(reference, 1, 12) for _ in range(2)]
    step = FusedDecodeStep(model)
    with torch.inference_mode():
        for m, cache in zip((reference, model), caches):
            m(ids[:, :6], kv_cache=cache)
        for t in range(6, 12):
            positions = torch.full((1, 1), t)
            want = reference(ids[:, t:t + 1], position_ids=positions, kv_cache=caches[0])[:, -1]
            torch.testing.assert_close(step(ids[:, t], positions, caches[1], None), want, atol=1e-4, rtol=1e-4)


def test_saving_a_packed_model_writes_the_dense_weights(tmp_path):
    from lmstack.checkpoints import load_hf, save_hf

    torch.manual_seed(0)
    model = build_model(TINY).eval()
    prune_(model, "magnitude", pattern="2:4")
    dense = copy.deepcopy(model)
    semi_sparse_(model)
    save_hf(model, tmp_path)
    loaded = load_hf(tmp_path)
    for (name, a), b in zip(dense.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
