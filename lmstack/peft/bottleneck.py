"""Bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"), as a mixin
over a whole sub-layer: two per block, after attention and after the feed-forward network.

    y   = sublayer(x)                                  (B, T, C)  the attention's or MLP's output
    out = y + up(f(down(y)))                           down: C -> m, up: m -> C, f a non-linearity

The adapter sits inside the residual branch, before the skip connection is added (and, in a post-norm
encoder, before the layer norm): the paper's placement. ``up`` starts at zero, so the model is unchanged
at start (the paper's near-identity initialisation, made exact); ``down`` is N(0, 0.02) as BERT's layers.
Not a linear map of the input, so it cannot be merged into the weights.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.nn.transforms import TransformError
from lmstack.peft.adapted import PeftLayer, materialize_

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), next(iter(module.buffers()), torch.empty(0))).device


class BottleneckLayer(PeftLayer):
    """Mixed in before an attention or feed-forward class by ``apply_bottleneck``."""

    transform_name = "bottleneck adapter"
    save_hint = "save the adapter (lmstack.peft.save_adapter): a bottleneck adapter cannot be folded into weights"

    def add_bottleneck(self, width: int, size: int, activation: str) -> None:
        device = _device(self)
        self.adapter_down = nn.Linear(width, size, device=device)
        self.adapter_up = nn.Linear(size, width, device=device)
        self.adapter_activation = activation
        self.merged, self.adapter_enabled = False, True
        if not self.adapter_down.weight.is_meta:
            self.initialize_added_()

    def added_tensors(self) -> list[str]:
        return [f"adapter_{side}.{t}" for side in ("down", "up") for t in ("weight", "bias")]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name.split(".")[0]).get_parameter(name.split(".")[1])
                for name in self.added_tensors()}

    def initialize_added_(self) -> None:
        for linear in (self.adapter_down, self.adapter_up):
            materialize_(linear, _device(self))
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The sub-layer's output (B, T, C) plus the adapter's correction of it."""
        y = super().forward(*args, **kwargs)
        if not self.adapter_enabled:
            return y
        return y + self.adapter_up(ACTIVATIONS[self.adapter_activation](self.adapter_down(y)))

    def merge(self) -> None:
        raise TransformError("a bottleneck adapter is not linear in its input and cannot be merged into the "
                             "weights; save the adapter instead")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def remove_adapter(self) -> None:
        del self.adapter_down, self.adapter_up
        for name in ("adapter_activation", "merged", "adapter_enabled"):
            self.__dict__.pop(name, None)

    def extra_repr(self) -> str:
        down = self.adapter_down
        return f"{super().extra_repr()}, bottleneck adapter {down.in_features}->{down.out_features} " \
               f"({self.adapter_activation})"
