"""LoRA (Hu et al., 2021), rsLoRA and DoRA (Liu et al., 2024) as a mixin over a linear layer.

    y = base(x) + s * B(A(dropout(x)))                      LoRA;  s = alpha / r  (rsLoRA: alpha / sqrt(r))
    y = base(x) + (m / n - 1) * W x + (m / n) * s * B(A(dropout(x)))      DoRA, n = ||W + s B A|| per output row

A: (r, in), Kaiming-uniform; B: (out, r), zeros, so the model is unchanged at the start. DoRA's magnitude
m (out,) starts as the row norms of W; n is detached from the graph (DoRA paper, section 4.3), as peft does.
``W x`` is the base output minus its bias, or recomputed from dropout(x) when dropout is active (peft's
rule). The base may be nn.Linear, SkinnyLinear or a QuantizedLinear (QLoRA: W is its dequantised codes).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.peft.adapted import PeftLayer, base_weight, materialize_, require_plain_weight, weight_device


class LoRALayer(PeftLayer):
    """Mixed in before a linear class by ``apply_lora`` (see ``lmstack.peft.adapted``)."""

    transform_name = "lora"
    save_hint = "merge it (lmstack.peft.merge_, or save_hf writes it merged) or save the adapter (save_adapter)"

    def add_lora(self, rank: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool) -> None:
        device = weight_device(self)
        self.rank, self.alpha, self.use_rslora, self.use_dora = rank, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device))
        self.merged, self.adapter_enabled = False, True
        self.transform_name = "dora" if use_dora else "lora"
        if device.type != "meta":
            self.initialize_added_()

    def added_tensors(self) -> list[str]:
        return ["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] if self.use_dora else [])

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Local name -> the parameters this adapter trains (what an adapter file holds)."""
        named = dict(self.named_parameters())
        return {name: named[name] for name in self.added_tensors()}

    def initialize_added_(self) -> None:
        """A Kaiming-uniform, B zeros (peft's default), m = ||W|| per row."""
        materialize_(self, weight_device(self))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(base_weight(self).detach().float().norm(dim=1))

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A: (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        result = super().forward(x)
        if self.merged or not self.adapter_enabled:
            return result
        dropped = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(dropped))
        if not self.use_dora:
            return result + lora * self.scaling
        weight = base_weight(self).to(x.dtype)
        norm = (weight + self.delta_weight().detach()).norm(dim=1).detach()
        factor = self.lora_magnitude_vector / norm  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            plain = result if self.bias is None else result - self.bias
        else:
            plain = F.linear(dropped, weight)
        return result + (factor - 1) * plain + factor * lora * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The (out, in) weight of a plain linear equal to this layer."""
        weight = base_weight(self).detach()
        merged = weight + self.delta_weight().detach()
        if not self.use_dora:
            return merged
        return (self.lora_magnitude_vector.detach() / merged.norm(dim=1))[:, None] * merged

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The plain nn.Linear state this layer stands for (a quantized base comes out dequantised, fp32)."""
        if self.merged:
            weight = self.weight.detach()
        else:
            weight = self.merged_weight()
        return {"weight": weight} | ({} if self.bias is None else {"bias": self.bias.detach()})

    def merge(self) -> None:
        """Fold the adapter into the base weight in place (forward then skips it)."""
        if self.merged:
            return
        require_plain_weight(self, "W + s B A")
        with torch.no_grad():
            self._unmerged_norm = (self.weight + self.delta_weight()).norm(dim=1) if self.use_dora else None
            self.weight.copy_(self.merged_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge`` (up to float rounding)."""
        if not self.merged:
            return
        with torch.no_grad():
            weight = self.weight
            if self.use_dora:
                weight = weight / (self.lora_magnitude_vector / self._unmerged_norm)[:, None]
            self.weight.copy_(weight - self.delta_weight())
        self.merged = False

    def remove_adapter(self) -> None:
        """Delete the adapter's modules and attributes (the caller restores the base class)."""
        for name in ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector"):
            if hasattr(self, name):
                delattr(self, name)
        for name in ("rank", "alpha", "use_rslora", "use_dora", "scaling", "merged", "adapter_enabled",
                     "transform_name", "_unmerged_norm"):
            self.__dict__.pop(name, None)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "rsLoRA" if self.use_rslora else "LoRA"
        return f"{super().extra_repr()}, {kind} r={self.rank}, alpha={self.alpha}"
