"""IA3 (Liu et al., 2022, "(IA)^3"): learned rescaling vectors, as a mixin over a linear layer.

    y = base(x) * l          attention targets (keys, values): l (out, 1) scales each output, bias included
    y = base(x * l)          feed-forward targets (the MLP's down projection): l (1, in) scales each input

l starts at ones (the model unchanged). The shapes and the two rules are peft's (``ia3_l``), so files
are interchangeable; merging multiplies the weight's rows (and the bias) or columns by l.
"""

import torch
from torch import nn

from lmstack.peft.adapted import PeftLayer, base_weight, materialize_, require_plain_weight, weight_device


class IA3Layer(PeftLayer):
    """Mixed in before a linear class by ``apply_ia3``."""

    transform_name = "ia3"
    save_hint = "merge it (lmstack.peft.merge_, or save_hf writes it merged) or save the adapter (save_adapter)"

    def add_ia3(self, feedforward: bool) -> None:
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.empty(shape, device=weight_device(self)))
        self.merged, self.adapter_enabled = False, True
        if self.ia3_l.device.type != "meta":
            self.initialize_added_()

    def added_tensors(self) -> list[str]:
        return ["ia3_l"]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def initialize_added_(self) -> None:
        materialize_(self, weight_device(self))
        nn.init.ones_(self.ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        if self.merged or not self.adapter_enabled:
            return super().forward(x)
        if self.feedforward:
            return super().forward(x * self.ia3_l.flatten())
        return super().forward(x) * self.ia3_l.flatten()

    def merged_state(self) -> dict[str, torch.Tensor]:
        if self.merged:
            return {"weight": self.weight.detach()} | ({} if self.bias is None else {"bias": self.bias.detach()})
        weight = base_weight(self).detach()  # a quantized base comes out dequantised, fp32
        scale = self.ia3_l.detach()
        state = {"weight": weight * scale}
        if self.bias is not None:
            state["bias"] = self.bias.detach() if self.feedforward else self.bias.detach() * scale.flatten()
        return state

    def merge(self) -> None:
        if self.merged:
            return
        require_plain_weight(self, "W * l")
        with torch.no_grad():
            state = self.merged_state()
            self.weight.copy_(state["weight"])
            if self.bias is not None:
                self.bias.copy_(state["bias"])
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            scale = self.ia3_l
            self.weight.div_(scale)
            if self.bias is not None and not self.feedforward:
                self.bias.div_(scale.flatten())
        self.merged = False

    def remove_adapter(self) -> None:
        del self.ia3_l
        for name in ("feedforward", "merged", "adapter_enabled"):
            self.__dict__.pop(name, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, IA3 {'inputs' if self.feedforward else 'outputs'}"
