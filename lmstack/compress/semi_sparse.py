"""2:4 semi-structured storage: a 2:4-pruned linear kept as its nonzero half, decoded by a CPU kernel that reads
about half the bytes of the dense weight.

    from lmstack.compress import prune_
    from lmstack.compress.semi_sparse import semi_sparse_
    prune_(model, "sparsegpt", pattern="2:4", calibration=batches)
    semi_sparse_(model)                                   # every 2:4 linear -> SemiSparseLinear
    generate(model, ids)                                  # the fused CPU step reads the packed weights

Layout (``pack_2of4``): of every 4 consecutive inputs of a row the 2 kept weights are stored in element order,
``values`` (out, in / 2) fp32, with their positions as a 4-bit code (bits 0-1 the first kept position, bits
2-3 the second), two groups to a byte, the first in the low nibble: ``codes`` (out, in / 8) uint8. A run of
32 inputs is 64 + 4 bytes instead of 128 (0.53x). This is the information NVIDIA's sparse tensor cores keep
(values plus 2-bit indices); ``torch.sparse.to_sparse_semi_structured`` packs it for CUDA only, so the CPU
layout is lmstack's own. The kernel (``csrc/quant_kernels.h``, ``sparse24_matmul``) expands each byte's 8
columns with one register permute and runs the same dot products as the dense skinny kernel; the reference
is ``unpack_2of4`` then ``F.linear``.

Storage is for inference: the packed tensors are buffers (no gradients), and a checkpoint holds the dense
weight with its zeros (``merged_state``), which Hugging Face format can hold.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.kernels.skinny_linear import SkinnyLinear


def pack_2of4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in / 2) fp32, codes (out, in / 8) uint8) of a weight (out, in) with at most 2 nonzeros in
    every group of 4 consecutive inputs (a group with fewer keeps zeros in the free slots).

    Raises:
        ConfigError: in not a multiple of 8, or a group with 3 or 4 nonzeros (naming the first).
    """
    out, width = weight.shape
    if width % 8:
        raise ConfigError(f"2:4 storage needs an input width divisible by 8, got {width}")
    groups = weight.detach().reshape(out, width // 4, 4)
    nonzero = groups != 0
    dense = nonzero.sum(dim=-1) > 2
    if bool(dense.any()):
        row, group = (int(i) for i in dense.nonzero()[0])
        raise ConfigError(f"weight is not 2:4 sparse: row {row}, inputs {4 * group}-{4 * group + 3} hold "
                          f"{int(nonzero[row, group].sum())} nonzeros (prune with pattern='2:4' first)")
    # The nonzero positions first, then the lowest free ones; each pair in increasing order.
    order = torch.argsort((~nonzero).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8), dim=-1, stable=True)
    positions = torch.sort(order[..., :2], dim=-1).values  # (out, in / 4, 2)
    values = groups.gather(-1, positions).reshape(out, width // 2).float().contiguous()
    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).reshape(out, width // 8, 2)
    codes = (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8).contiguous()
    return values, codes


def unpack_2of4(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The dense weight (out, in) of ``pack_2of4``'s tensors (the readable reference)."""
    out, half = values.shape
    nibbles = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(out, half // 2).long()  # one per group
    positions = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)  # (out, in / 4, 2)
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(out, half // 2, 2))
    return dense.reshape(out, 2 * half)


def is_2of4(weight: torch.Tensor) -> bool:
    """Whether at most 2 of every 4 consecutive inputs of each row are nonzero (and the width allows it)."""
    out, width = weight.shape
    return width % 32 == 0 and bool(((weight.detach().reshape(out, width // 4, 4) != 0).sum(-1) <= 2).all())


class SemiSparseLinear(nn.Module):
    """A 2:4-sparse linear stored as ``pack_2of4``'s values and codes (buffers), with the bias kept."""

    transform_name = "2:4 sparse storage"
    save_hint = "save_hf writes the dense weight with its zeros"

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, codes = pack_2of4(linear.weight)
        self.register_buffer("values", values)
        self.register_buffer("codes", codes)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features): the kernel for 1-8 rows at inference, else the reference."""
        from lmstack.kernels.quant_matmul import MAX_ROWS, quant_kernels, sparse24_matmul

        rows = x.numel() // self.in_features
        if (1 <= rows <= MAX_ROWS and quant_kernels() is not None and not torch.is_grad_enabled()
                and x.dtype is torch.float32 and x.device.type == "cpu" and self.in_features % 32 == 0):
            y = sparse24_matmul(x.reshape(rows, self.in_features).contiguous(), self.values, self.codes, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, unpack_2of4(self.values, self.codes).to(x.dtype), self.bias)

    def added_tensors(self) -> list[str]:
        return ["values", "codes"]

    def merged_state(self) -> dict[str, torch.Tensor]:
        state = {"weight": unpack_2of4(self.values, self.codes)}
        if self.bias is not None:
            state["bias"] = self.bias.detach()
        return state

    def decode_operands(self):
        """The fused decoding step's view of this layer (format SPARSE24: values, codes in aux slot 0)."""
        from lmstack.kernels.skinny_linear import SPARSE24, DecodeOperands

        return DecodeOperands(self.values, self.bias, SPARSE24, 0, [self.codes])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 sparse"


def semi_sparse_(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Swap every linear whose weight is 2:4 sparse (and whose width the kernel takes: a multiple of 32) for a
    SemiSparseLinear, in place; returns the names swapped. A linear with a pruning mask loses it (the packed
    layer holds the zeros by construction)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Linear, SkinnyLinear) or name in exclude or not is_2of4(module.weight):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, SemiSparseLinear(module))
        swapped.append(name)
    return swapped
