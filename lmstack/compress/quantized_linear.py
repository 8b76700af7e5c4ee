"""QuantizedLinear: an nn.Linear whose weight is held in a low-bit format (int8, int4, NF4), computing in fp32.

    y = A(x * input_scale) @ dequantize(codes)^T + bias      (``reference_forward``: the readable definition)

``input_scale`` (in,) exists only for AWQ-chosen weights (its per-channel scaling divided back out). A is
the identity (weight-only quantization), or with ``activations="int8"`` (dynamic quantization; int8 and
int4 weights) the rounding of x to int8 per token or per weight group (``formats.quantize_activations``):
then the decoding kernels multiply integers (``csrc/dynamic_kernels.h``): 1.2x (int8) to 1.6x (int4) faster
at batch 1 (README table).

The fast paths compute the same thing without materialising the whole fp32 weight:
- 1 to 8 rows (a decoding step): the C++ kernels (``lmstack.kernels.quant_matmul``) unpack codes in
  registers and accumulate in fp32 (equal to the reference up to float summation order);
- more rows (a prompt, a training batch): with int8 activations on an AVX-512 VNNI build, an integer GEMM
  (``csrc/dynamic_gemm.h``: panels of the weight repacked for vpdpbusd, about 3x an fp32 matmul); otherwise
  blocked matmuls over row tiles of the weight dequantised on the fly, so at most one tile (about 4 MB) of
  fp32 weight exists at a time.
Autograd flows to the input and the bias (the codes are buffers, frozen), which is what QLoRA needs.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress import formats
from lmstack.errors import ConfigError
from lmstack.kernels import quant_matmul as kernels
from lmstack.kernels.skinny_linear import INT4, INT4_DYNAMIC, INT8, INT8_DYNAMIC, NF4, DecodeOperands

SCHEMES = ("int8", "int4", "nf4")
ACTIVATIONS = (None, "int8")  # None: fp32 activations (weight-only quantization)
TILE_ELEMENTS = 1 << 20  # fp32 weight elements dequantised at a time on the tiled path


def check_shape(scheme: str, in_features: int, group_size: int | None) -> None:
    """Raise ConfigError if ``scheme`` cannot store a weight with ``in_features`` columns."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4":
        if group_size not in (32, 64, 128, 256):
            raise ConfigError(f"int4 group size must be 32, 64, 128 or 256, got {group_size}")
        if in_features % 32:
            raise ConfigError(f"int4 needs widths that are multiples of 32, got {in_features}")
    if scheme == "nf4" and in_features % formats.NF4_BLOCK:
        raise ConfigError(f"nf4 needs widths that are multiples of {formats.NF4_BLOCK}, got {in_features}")
    if scheme == "int8" and in_features % 32:
        raise ConfigError(f"int8 needs widths that are multiples of 32, got {in_features}")
    if scheme == "int8" and group_size not in (None, 32, 64, 128, 256):
        raise ConfigError(f"int8 group size must be none (per row), 32, 64, 128 or 256, got {group_size}")


def check_activations(scheme: str, activations: str | None) -> None:
    """Raise ConfigError unless ``activations`` is None or a dynamic format ``scheme``'s kernels multiply."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"unknown activation quantization {activations!r}; choose none or int8")
    if activations is not None and scheme == "nf4":
        raise ConfigError("nf4 keeps fp32 activations (its levels are not integers); int8 activations need "
                          "int8 or int4 weights")


class QuantizedTransform:
    """What a quantized module (linear or embedding) is to ``lmstack.nn.transforms``: its codes are tensors a
    Hugging Face file has no place for, and it offers no merge, so ``save_hf`` refuses it (``save_hint`` says
    what to do instead) unless asked to write ``dequantized_state()``."""

    save_hint = ("save it with lmstack.compress.files.save_quantized (lmstack quantize), or write a plain fp32 "
                 "checkpoint with save_hf(model, path, dequantize=True)")

    @property
    def transform_name(self) -> str:
        return f"{self.scheme} quantization"

    def added_tensors(self) -> list[str]:
        return list(self.tensors())


class QuantizedLinear(QuantizedTransform, nn.Module):
    """Holds ``scheme``'s tensors (see ``lmstack.compress.formats``) as buffers and the bias as a Parameter."""

    def dequantized_state(self) -> dict[str, torch.Tensor]:
        """The nn.Linear state the codes stand for (``save_hf(..., dequantize=True)``)."""
        return {"weight": self.dequantize()} | ({} if self.bias is None else {"bias": self.bias.detach()})

    def __init__(self, in_features: int, out_features: int, scheme: str, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, group_size: int | None = None, activations: str | None = None) -> None:
        super().__init__()
        check_shape(scheme, in_features, group_size)
        check_activations(scheme, activations)
        self.in_features, self.out_features, self.scheme, self.group_size = in_features, out_features, scheme, group_size
        self.activations = activations
        for name, value in tensors.items():
            self.register_buffer(name, value)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=bias.requires_grad)
        self.register_buffer("levels", torch.tensor(formats.NF4_LEVELS), persistent=False)
        if scheme == "nf4" and "absmax_codes" in tensors:
            self.register_buffer("absmax_code", formats.dynamic_map_signed(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = None,
                    tensors: dict[str, torch.Tensor] | None = None, activations: str | None = None) -> "QuantizedLinear":
        """Quantize ``linear`` by round-to-nearest, or wrap ``tensors`` a calibrated method chose."""
        check_shape(scheme, linear.in_features, group_size)
        check_activations(scheme, activations)
        if tensors is None:
            weight = linear.weight.detach()
            tensors = {"int8": lambda w: formats.quantize_int8(w, group_size), "nf4": formats.quantize_nf4,
                       "int4": lambda w: formats.quantize_int4(w, group_size)}[scheme](weight)
        return cls(linear.in_features, linear.out_features, scheme, tensors, linear.bias, group_size, activations)

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor this scheme stores (``input_scale`` optional for int4)."""
        out, n_in = self.out_features, self.in_features
        if self.scheme == "int8":
            scales = (out,) if self.group_size is None else (out, -(-n_in // self.group_size))
            return {"qweight": ((out, n_in), torch.int8), "scales": (scales, torch.float32)}
        packed = {"qweight": ((out, n_in // 2), torch.uint8)}
        if self.scheme == "int4":
            groups = (out, -(-n_in // self.group_size))
            offsets = {"mins": (groups, torch.float32)} if "mins" in self._buffers else {"zeros": (groups, torch.int8)}
            return {**packed, "scales": (groups, torch.float32), **offsets}
        blocks = out * n_in // formats.NF4_BLOCK
        if "absmax" in self._buffers:
            return {**packed, "absmax": ((blocks,), torch.float32)}
        return {**packed, "absmax_codes": ((blocks,), torch.uint8),
                "absmax_scales": ((-(-blocks // formats.NF4_ABSMAX_BLOCK),), torch.float32),
                "absmax_offset": ((), torch.float32)}

    def check_tensors(self) -> None:
        """Raise ValueError naming the first stored tensor that is missing, unexpected or misshapen."""
        expected, stored = self.expected_tensors(), self.tensors()
        if self.scheme == "int4" and "input_scale" in stored:
            expected["input_scale"] = ((self.in_features,), torch.float32)
        for name in sorted(set(expected) | set(stored)):
            if name not in stored or name not in expected:
                raise ValueError(f"{self.scheme} tensor {name!r} is {'missing' if name not in stored else 'unexpected'}")
            shape, dtype = expected[name]
            if tuple(stored[name].shape) != shape or stored[name].dtype != dtype:
                raise ValueError(f"{self.scheme} tensor {name!r} is {stored[name].dtype} {list(stored[name].shape)}, "
                                 f"expected {dtype} {list(shape)}")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored format tensors (what ``formats.dequantize_*`` takes)."""
        return {name: buf for name, buf in self.named_buffers(recurse=False) if name not in ("levels", "absmax_code")}

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (out, in) the codes stand for: the reference."""
        if self.scheme == "int4":
            return formats.dequantize_int4(self.tensors(), self.group_size)
        if self.scheme == "int8":
            return formats.dequantize_int8(self.tensors(), self.group_size)
        return formats.dequantize_nf4(self.tensors())

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self._prepare_input(x), self.dequantize().to(x.dtype), bias)

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """A(x * input_scale) of the module docstring."""
        x = x * self.input_scale if "input_scale" in self._buffers else x
        if self.activations is None:
            return x
        return formats.fake_quantize_activations(x, self.group_size).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        rows = x.numel() // self.in_features
        if not self._native(x):
            return self.reference_forward(x)
        flat = x.reshape(rows, self.in_features)
        if "input_scale" in self._buffers:
            flat = flat * self.input_scale
        training = torch.is_grad_enabled() and (flat.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if rows <= kernels.MAX_ROWS and not training:
            out = self._skinny(flat.contiguous())
        elif training and self.activations is None:  # QLoRA: no dequantised weight kept for backward
            out = _FrozenQuantizedMatmul.apply(flat, self.bias, self)
        else:  # prompts: integer products with int8 activations where the build has them, else fp32 tiles
            out = self._integer_gemm(flat) if self.activations == "int8" and not training else None
            if out is None:
                out = self._tiled(flat if self.activations is None else self._rounded(flat))
        return out.view(*x.shape[:-1], self.out_features)

    def _native(self, x: torch.Tensor) -> bool:
        """fp32 input on CPU, fp32 scales (``model.half()`` would convert them), and built kernels."""
        return (x.device.type == "cpu" and x.dtype is torch.float32 and x.numel() > 0
                and self.qweight.device.type == "cpu" and kernels.quant_kernels() is not None
                and all(t.dtype is torch.float32 for t in self._buffers.values() if t.is_floating_point()))

    def _rounded(self, x: torch.Tensor) -> torch.Tensor:
        """A(x) for a prompt's rows: compiled, or the reference where autograd needs to see it."""
        if torch.is_grad_enabled() and x.requires_grad:
            return formats.fake_quantize_activations(x, self.group_size)
        return kernels.fake_quantize_activations(x.contiguous(), self.group_size)

    def _skinny(self, x: torch.Tensor) -> torch.Tensor:
        bias, dynamic = None if self.bias is None else self.bias.detach(), self.activations == "int8"
        if self.scheme == "int8":
            return kernels.int8_matmul(x, self.qweight, self.scales, bias, self.group_size or 0, dynamic)
        if self.scheme == "int4":
            return kernels.int4_matmul(x, self.qweight, self.scales, self._buffers.get("zeros"),
                                       self._buffers.get("mins"), bias, self.group_size, dynamic)
        if "absmax_codes" in self._buffers:
            return kernels.nf4_matmul(x, self.qweight, self.levels, self.absmax_codes, self.absmax_code,
                                      self.absmax_scales, float(self.absmax_offset), bias)
        return kernels.nf4_matmul(x, self.qweight, self.levels, None, self.absmax, None, 0.0, bias)

    def _integer_gemm(self, x: torch.Tensor) -> torch.Tensor | None:
        """A prompt's rows through the int8-activation GEMM (AVX-512 VNNI builds); None where there is none."""
        bias = None if self.bias is None else self.bias.detach()
        return kernels.dynamic_gemm(x.contiguous(), self.qweight, self.scales, self._buffers.get("zeros"),
                                    self._buffers.get("mins"), bias, self.group_size or 0)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) as matmuls over tiles of dequantised weight rows."""
        bias = None if self.bias is None else self.bias.detach()
        tiles = [F.linear(x, weight, None if bias is None else bias[start:stop])
                 for start, stop, weight in self._weight_tiles()]
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)

    def _tiled_input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """(rows, out) -> (rows, in): grad @ W, over the same tiles (dequantised again, not kept)."""
        total = None
        for start, stop, weight in self._weight_tiles():
            part = grad[:, start:stop] @ weight
            total = part if total is None else total.add_(part)
        return total

    def _weight_tiles(self):
        """(start, stop, fp32 rows start:stop of the weight), about TILE_ELEMENTS elements at a time."""
        step = max(1, TILE_ELEMENTS // self.in_features)
        absmax = formats.nf4_absmax(self.tensors()) if self.scheme == "nf4" else None
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            if self.scheme == "int8":
                weight = kernels.int8_dequant(self.qweight, self.scales, start, stop, self.group_size or 0)
            elif self.scheme == "int4":
                weight = kernels.int4_dequant(self.qweight, self.scales, self._buffers.get("zeros"),
                                              self._buffers.get("mins"), start, stop, self.group_size)
            else:
                weight = kernels.nf4_dequant(self.qweight, self.levels, absmax, start, stop)
            yield start, stop, weight

    def decode_operands(self) -> DecodeOperands:
        """The tensors the fused decoding step reads (slots of decode_step.cpp's ``Format`` comment)."""
        bias, scale, dynamic = self.bias, self._buffers.get("input_scale"), self.activations == "int8"
        if self.scheme == "int8":
            return DecodeOperands(self.qweight, bias, INT8_DYNAMIC if dynamic else INT8, self.group_size or 0,
                                  [self.scales, None, None, None, None, scale])
        if self.scheme == "int4":
            return DecodeOperands(self.qweight, bias, INT4_DYNAMIC if dynamic else INT4, self.group_size,
                                  [self.scales, self._buffers.get("zeros"), self._buffers.get("mins"), None, None, scale])
        if "absmax_codes" in self._buffers:
            return DecodeOperands(self.qweight, bias, NF4, formats.NF4_BLOCK,
                                  [self.absmax_codes, self.absmax_scales, self.absmax_code, self.levels,
                                   self.absmax_offset, scale])
        return DecodeOperands(self.qweight, bias, NF4, formats.NF4_BLOCK, [None, self.absmax, None, self.levels, None, scale])

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        activations = f", activations={self.activations}" if self.activations else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}"
                f"{activations}, bias={self.bias is not None}")


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x @ W^T + b for a frozen quantized W, differentiable in x and b, saving no weight for backward:
    the backward pass dequantises the tiles again (as bitsandbytes' 4-bit matmul does). Without it, autograd
    would keep every fp32 tile of every layer alive until backward: QLoRA at full fine-tuning's memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, module: QuantizedLinear) -> torch.Tensor:
        ctx.module, ctx.has_bias = module, bias is not None
        return module._tiled(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        grad_x = ctx.module._tiled_input_grad(grad) if ctx.needs_input_grad[0] else None
        grad_bias = grad.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None

