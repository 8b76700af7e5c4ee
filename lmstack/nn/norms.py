"""Normalisation layers: LayerNorm (optional bias) and RMSNorm.

RMSNorm: Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467. Shapes: (..., C) in, (..., C) out.
"""

from typing import Literal

import torch
from torch import nn

from lmstack.errors import ConfigError

NormKind = Literal["layernorm", "rmsnorm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * weight``.

    Args:
        dim: size C of the last axis.
        eps: added to the mean square before the square root.
        unit_offset: if True the stored weight is an offset from 1 (Gemma style): scale = 1 + weight.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C), same dtype as x."""
        # Normalise in fp32 whatever the input dtype: the mean of squares overflows/underflows in fp16.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = 1.0 + self.weight if self.unit_offset else self.weight
        return scale * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


def make_norm(kind: NormKind, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """Build the normalisation layer named by ``kind`` ("layernorm" or "rmsnorm")."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ConfigError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")
