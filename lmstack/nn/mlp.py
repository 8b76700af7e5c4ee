"""Feed-forward blocks: the plain two-layer MLP (GPT-2) and the gated MLP (SwiGLU/GeGLU, Llama).

GLU variants: Shazeer 2020, https://arxiv.org/abs/2002.05202. Shapes: (B, T, C) in and out.
"""

from functools import partial
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError

MLPKind = Literal["plain", "gated"]

# Names are the math, not a model family: "gelu_tanh" is GPT-2's "gelu_new".
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the activation function registered under ``name``."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class _GatedProduct(torch.autograd.Function):
    """``act(gate) * up`` that keeps only ``gate`` and ``up`` for backward and recomputes ``act(gate)`` there.

    Plain autograd also keeps ``act(gate)`` (the product's backward needs it): one more (B, T, hidden)
    tensor per block, the widest activations a block has. Recomputing it costs one element-wise pass.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return ACTIVATIONS[activation](gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(True)
            activated = ACTIVATIONS[ctx.activation](leaf)
        (grad_gate,) = torch.autograd.grad(activated, leaf, grad * up)
        return grad_gate, grad * activated.detach(), None


def gated_product(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` (B, T, hidden). While gradients are recorded it runs as ``_GatedProduct`` (less
    memory, same values); otherwise, and as its reference, the plain expression. Under ``torch.compile`` it is
    the plain expression too: dynamo cannot trace the ``autograd.grad`` in that backward (a graph break, and
    under activation checkpointing the whole block fell back to eager), while AOTAutograd's min-cut
    partitioner recomputes cheap element-wise ops in backward by itself."""
    if torch.compiler.is_compiling():
        return ACTIVATIONS[activation](gate) * up
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _GatedProduct.apply(gate, up, activation)
    return ACTIVATIONS[activation](gate) * up


class MLP(nn.Module):
    """``fc_out(act(fc_in(x)))`` with hidden width ``hidden_dim``."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu_tanh", bias: bool = True) -> None:
        super().__init__()
        self.activation = activation
        self.act = get_activation(activation)
        self.fc_in = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc_out = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        return self.fc_out(self.act(self.fc_in(x)))


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU with silu, GeGLU with gelu."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.activation = activation
        self.act = get_activation(activation)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        return self.down_proj(gated_product(self.gate_proj(x), self.up_proj(x), self.activation))


def make_mlp(kind: MLPKind, dim: int, hidden_dim: int, activation: str, bias: bool) -> nn.Module:
    """Build the feed-forward block named by ``kind`` ("plain" or "gated")."""
    if kind == "plain":
        return MLP(dim, hidden_dim, activation, bias)
    if kind == "gated":
        return GatedMLP(dim, hidden_dim, activation, bias)
    raise ConfigError(f"unknown mlp {kind!r}; expected 'plain' or 'gated'")
