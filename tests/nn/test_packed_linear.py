"""oneDNN-packed linears equal their reference (F.linear + activation) up to fp32 rounding; packing a model keeps
its state dict, its gradients (the reference path trains) and follows weights changed after packing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.models import build_model
from lmstack.nn import packed_linear
from lmstack.nn.mlp import ACTIVATIONS
from lmstack.nn.packed_linear import PackedLinear, pack_linears_

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this PyTorch build has no oneDNN linear")


@pytest.mark.parametrize("activation", [None, *sorted(ACTIVATIONS)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_the_reference(activation, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear, activation)
    for x in (torch.randn(5, 48), torch.randn(3, 7, 48), torch.randn(1, 48)):
        with torch.no_grad():
            expected = F.linear(x, linear.weight, linear.bias)
            expected = ACTIVATIONS[activation](expected) if activation else expected
            torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(packed.reference(x), expected, atol=0, rtol=0)


def _encoder_inputs():
    ids = torch.randint(5, 500, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return ids, mask


def test_a_packed_encoder_gives_the_same_states_and_state_dict():
    reference = build_model("tiny-bert", seed=0).eval()
    packed = copy.deepcopy(reference)
    linears = sum(type(m) is nn.Linear for m in reference.modules())
    assert pack_linears_(packed) == linears and not any(type(m) is nn.Linear for m in packed.modules())
    assert isinstance(packed.layers[0].mlp.fc_in, PackedLinear) and packed.layers[0].mlp.fc_in.activation
    ids, mask = _encoder_inputs()
    with torch.no_grad():
        torch.testing.assert_close(packed.hidden_states(ids, mask), reference.hidden_states(ids, mask),
                                   atol=1e-5, rtol=1e-5)
    ours, theirs = packed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_gradients_flow_through_the_reference_path():
    reference = build_model("tiny-bert", seed=0).train()
    packed = copy.deepcopy(reference)
    pack_linears_(packed)
    ids, mask = _encoder_inputs()
    for model in (reference, packed):
        torch.manual_seed(3)  # the same dropout masks
        model.hidden_states(ids, mask).square().mean().backward()
    for (name, p), q in zip(packed.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)


def test_weights_changed_after_packing_are_repacked():
    model = build_model("tiny-bert", seed=0).eval()
    pack_linears_(model)
    ids, mask = _encoder_inputs()
    with torch.no_grad():
        model.hidden_states(ids, mask)  # packs every weight once
        other = build_model("tiny-bert", seed=1).eval()
        model.load_state_dict(other.state_dict())  # copies into the same Parameters (in place)
        torch.testing.assert_close(model.hidden_states(ids, mask), other.hidden_states(ids, mask),
                                   atol=1e-5, rtol=1e-5)


def test_nothing_is_packed_without_onednn(monkeypatch):
    monkeypatch.setattr(packed_linear, "available", lambda: False)
    model = build_model("tiny-bert", seed=0)
    assert pack_linears_(model) == 0 and not any(isinstance(m, PackedLinear) for m in model.modules())
