"""Norms and feed-forward blocks against their formulas."""

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import ConfigError
from lmstack.nn import GatedMLP, MLP, RMSNorm, make_mlp, make_norm


def test_rmsnorm_formula():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 6)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want)


def test_rmsnorm_unit_offset_starts_as_identity_scale():
    x = torch.randn(4, 6)
    torch.testing.assert_close(RMSNorm(6, unit_offset=True)(x), RMSNorm(6)(x))


def test_layernorm_without_bias():
    norm = make_norm("layernorm", 6, 1e-5, bias=False)
    assert norm.bias is None
    x = torch.randn(3, 6)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (6,), eps=1e-5))


def test_gated_mlp_is_swiglu():
    mlp = GatedMLP(8, 16, "silu")
    x = torch.randn(2, 8)
    want = mlp.down_proj.weight @ (F.silu(mlp.gate_proj.weight @ x.T) * (mlp.up_proj.weight @ x.T))
    torch.testing.assert_close(mlp(x), want.T)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_gated_product_matches_plain_autograd_and_keeps_two_tensors(activation):
    from lmstack.nn.mlp import ACTIVATIONS, gated_product
    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(2, 5, 16, generator=g) for _ in range(3))
    leaves = [t.clone().requires_grad_(True) for t in (gate, up, gate, up)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused = gated_product(leaves[0], leaves[1], activation)
    reference = ACTIVATIONS[activation](leaves[2]) * leaves[3]
    torch.testing.assert_close(fused, reference, atol=0, rtol=0)
    fused.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(leaves[0].grad, leaves[2].grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(leaves[1].grad, leaves[3].grad, atol=0, rtol=0)
    assert len(saved) == 2  # gate and up; act(gate) is recomputed in backward
    with torch.no_grad():
        assert torch.equal(gated_product(gate, up, activation), ACTIVATIONS[activation](gate) * up)


def test_gated_mlp_compiles_without_a_graph_break_and_equals_eager():
    """fullgraph=True fails on a graph break: _GatedProduct's backward calls autograd.grad, which dynamo cannot
    trace (under activation checkpointing that sent whole blocks back to eager)."""
    from lmstack.nn.mlp import GatedMLP
    torch.manual_seed(0)
    mlp, x = GatedMLP(8, 16), torch.randn(2, 3, 8)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    mlp(x).square().sum().backward()
    for got, want in zip(grads, (p.grad for p in mlp.parameters())):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_plain_mlp_uses_tanh_gelu():
    mlp = MLP(8, 16, "gelu_tanh")
    x = torch.randn(2, 8)
    h = F.linear(x, mlp.fc_in.weight, mlp.fc_in.bias)
    want = F.linear(0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3))), mlp.fc_out.weight,
                    mlp.fc_out.bias)
    torch.testing.assert_close(mlp(x), want)


def test_unknown_choices_are_config_errors():
    with pytest.raises(ConfigError, match="unknown norm 'batchnorm'"):
        make_norm("batchnorm", 4, 1e-5)
    with pytest.raises(ConfigError, match="unknown mlp"):
        make_mlp("moe?", 4, 8, "silu", False)
    with pytest.raises(ConfigError, match="unknown activation 'tanhh'"):
        MLP(4, 8, "tanhh")
