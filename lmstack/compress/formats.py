"""Low-bit number formats for linear weights: how a float matrix becomes packed codes and back.

Each format is a pair of functions, ``quantize_*(weight) -> dict of tensors`` and ``dequantize_*(tensors)
-> weight``; the dict is exactly what a quantized layer stores (and what its safetensors file holds).
The formulas follow the reference libraries so that the codes match theirs (tests compare them):

    int8   per output row, symmetric:  scale = amax_row / 127.5,  q = clamp(round(w * (1/scale)), -128, 127)
           (torchao's Int8WeightOnlyConfig; multiplying by the reciprocal is what makes ties match);
           GGUF's Q8_0 loads as int8 with a scale per group of 32
    int4   per group of ``group_size`` inputs, asymmetric: scale = (max(mx, 0) - min(mn, 0)) / 15,
           zero = clamp(-8 - round(mn / scale), -8, 7),  q = clamp(round(w / scale) + zero, -8, 7),
           w ~ (q - zero) * scale  (torchao's IntxWeightOnlyConfig(int4, PerGroup, ASYMMETRIC));
           GGUF's Q4_0 loads as int4 group 32 with zero points 0, Q4_1 with float ``mins`` instead
    nf4    blocks of 64 consecutive weights (row-major), absmax-scaled, nearest of the 16 NormalFloat4
           levels of QLoRA; double quantization stores each absmax as an 8-bit code of a signed dynamic
           map over blocks of 256 absmaxes, minus their mean (bitsandbytes' quantize_4bit / compress_statistics)

Activations (``QuantizedLinear(..., activations="int8")``, dynamic quantization) are rounded to int8 per
block of inputs as each call starts: scale = max(amax_block / L, eps), q = clamp(round(x * (1/scale)),
-128, 127). Per token (per-row int8 weights) L = 127.5: torchao's Int8DynamicActivationInt8WeightConfig.
Per group of the weight (grouped int8, int4: as llama.cpp pairs Q4_0 weights with Q8_0 activations)
L = 127, llama.cpp's Q8_0 rule, which puts the largest element on +-127 exactly rather than on the rounding
boundary -127.5 (where a last-bit difference in x picks -127 or -128).

Packing: two 4-bit codes per byte. int4 stores element 2j in the low nibble of byte j and 2j+1 in the high
nibble (codes offset by 8 to 0..15); nf4 stores element 2j in the *high* nibble, as bitsandbytes does.
"""

import torch

# The 16 NF4 levels (quantiles of a standard normal, rescaled to [-1, 1], with an exact zero), as
# bitsandbytes' get_4bit_type("nf4") lists them.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_BLOCK = 64
NF4_ABSMAX_BLOCK = 256  # absmaxes per block of the double quantization


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """(out, in) float -> ``qweight`` int8 (out, in), ``scales`` float32 (out,), or with ``group_size``
    (out, ceil(in / group_size)): the same rule per group of inputs instead of per row."""
    w = weight.detach().float()
    if group_size is None:
        scales = (w.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
        q = torch.clamp(torch.round(w * (1.0 / scales)[:, None]), -128, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}
    groups = torch.nn.functional.pad(w, (0, (-w.shape[1]) % group_size)).reshape(w.shape[0], -1, group_size)
    scales = (groups.abs().amax(dim=2) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(w * per_column(1.0 / scales, group_size, w.shape[1])), -128, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def dequantize_int8(t: dict[str, torch.Tensor], group_size: int | None = None) -> torch.Tensor:
    """Scales per row, or (``group_size``; GGUF's Q8_0 loaded as is) per group of inputs."""
    codes = t["qweight"].float()
    if group_size is None:
        return codes * t["scales"][:, None]
    return codes * per_column(t["scales"], group_size, codes.shape[1])


def quantize_activations(x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) float -> int8 codes (..., n) and fp32 scales (..., ceil(n / block)), one per block of ``block``
    inputs (None: one per row, i.e. per token, torchao's rule); the last block may be shorter."""
    n = x.shape[-1]
    levels = 127.5 if block is None else 127.0  # see the module docstring
    block = block or n
    padded = torch.nn.functional.pad(x.float(), (0, (-n) % block))
    blocks = padded.reshape(*x.shape[:-1], -1, block)
    scales = (blocks.abs().amax(dim=-1) / levels).clamp(min=torch.finfo(torch.float32).eps)
    codes = torch.clamp(torch.round(blocks * (1.0 / scales)[..., None]), -128, 127)
    return codes.reshape(padded.shape)[..., :n].to(torch.int8), scales


def fake_quantize_activations(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The float values ``quantize_activations`` codes stand for (codes * their block's scale)."""
    codes, scales = quantize_activations(x, block)
    block = block or x.shape[-1]
    return codes.float() * scales.repeat_interleave(block, dim=-1)[..., :x.shape[-1]]


def int4_params(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zero points, each (out, ceil(in / group_size)); a last, shorter group
    covers a width that ``group_size`` does not divide (576 = 4 x 128 + 64)."""
    w = weight.detach().float()
    # Zero padding leaves min(mn, 0) and max(mx, 0) unchanged.
    groups = torch.nn.functional.pad(w, (0, (-w.shape[1]) % group_size)).reshape(w.shape[0], -1, group_size)
    lo, hi = groups.amin(dim=2).clamp(max=0), groups.amax(dim=2).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).eps)
    zeros = torch.clamp(-8 - torch.round(lo / scales), -8, 7)
    return scales, zeros


def per_column(group_values: torch.Tensor, group_size: int, width: int) -> torch.Tensor:
    """(out, groups) -> (out, width): each group's value repeated over its columns."""
    return group_values.repeat_interleave(group_size, dim=1)[:, :width]


def int4_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes in [-8, 7], (out, in), for given per-group scales and zero points."""
    width = weight.shape[1]
    s, z = per_column(scales, group_size, width), per_column(zeros, group_size, width)
    return torch.clamp(torch.round(weight.detach().float() / s) + z, -8, 7)


def quantize_int4(weight: torch.Tensor, group_size: int = 128, scales: torch.Tensor | None = None,
                  zeros: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(out, in) float -> ``qweight`` uint8 (out, in // 2), ``scales`` float32 and ``zeros`` int8, both
    (out, ceil(in / group_size)). Calibrated methods (GPTQ, AWQ) pass their own scales, zeros or codes."""
    if scales is None:
        scales, zeros = int4_params(weight, group_size)
    if codes is None:
        codes = int4_codes(weight, scales, zeros, group_size)
    return {"qweight": pack_nibbles((codes + 8).to(torch.uint8), high_first=False), "scales": scales.float(),
            "zeros": zeros.to(torch.int8)}


def dequantize_int4(t: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """(code - 8 - zero) * scale; or, with float ``mins`` instead of zero points (GGUF's Q4_1 loaded as is),
    code * scale + min (codes as stored, in [0, 16))."""
    stored = unpack_nibbles(t["qweight"], high_first=False).float()
    width = stored.shape[1]
    scales = per_column(t["scales"], group_size, width)
    if "mins" in t:
        return stored * scales + per_column(t["mins"], group_size, width)
    return (stored - 8 - per_column(t["zeros"].float(), group_size, width)) * scales


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """(out, in) float -> ``qweight`` uint8 (out, in // 2) and the block absmaxes: ``absmax`` float32
    (blocks,), or with ``double_quant`` ``absmax_codes`` uint8 (blocks,), ``absmax_scales`` float32
    (ceil(blocks / 256),) and ``absmax_offset`` float32 () (the mean that was subtracted)."""
    out_features = weight.shape[0]
    blocks = weight.detach().float().reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    levels = torch.tensor(NF4_LEVELS)
    codes = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2)  # nearest level
    packed = pack_nibbles(codes.to(torch.uint8).reshape(out_features, -1), high_first=True)
    if not double_quant:
        return {"qweight": packed, "absmax": absmax}
    offset = absmax.mean()
    absmax_codes, absmax_scales = quantize_blockwise_dynamic(absmax - offset)
    return {"qweight": packed, "absmax_codes": absmax_codes, "absmax_scales": absmax_scales,
            "absmax_offset": offset}


def nf4_absmax(t: dict[str, torch.Tensor], blocks: torch.Tensor | None = None) -> torch.Tensor:
    """The per-block absmax, decoded from the double quantization where it was used; with ``blocks`` (int64
    indices), only those blocks' (an embedding lookup's rows)."""
    if "absmax" in t:
        return t["absmax"] if blocks is None else t["absmax"][blocks]
    if blocks is None:
        return dequantize_blockwise_dynamic(t["absmax_codes"], t["absmax_scales"]) + t["absmax_offset"]
    values = dynamic_map_signed()[t["absmax_codes"][blocks].long()]
    return values * t["absmax_scales"][blocks // NF4_ABSMAX_BLOCK] + t["absmax_offset"]


def dequantize_nf4(t: dict[str, torch.Tensor]) -> torch.Tensor:
    codes = unpack_nibbles(t["qweight"], high_first=True).long()
    values = torch.tensor(NF4_LEVELS)[codes].reshape(-1, NF4_BLOCK) * nf4_absmax(t)[:, None]
    return values.reshape(codes.shape)


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: 256 sorted values in [-1, 1] whose exponent
    bits grow with magnitude (fine steps near zero), used to store the NF4 absmaxes in 8 bits."""
    values, max_exponent, additional = [], 7, 7  # 8 bits: 1 sign, 7 shared between exponent and fraction
    for i in range(max_exponent):
        fraction_items = 2 ** (i + additional - max_exponent) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += (10 ** (-(max_exponent - 1) + i) * means).tolist()
        values += (-(10 ** (-(max_exponent - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def quantize_blockwise_dynamic(x: torch.Tensor, block: int = NF4_ABSMAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of ``x`` on the signed dynamic map, scaled per block of ``block`` by its absmax."""
    code = dynamic_map_signed()
    padded = torch.nn.functional.pad(x.float(), (0, (-x.numel()) % block)).reshape(-1, block)
    scales = padded.abs().amax(dim=1)
    normalized = padded / scales.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    index = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2)
    return index.reshape(-1)[:x.numel()].to(torch.uint8), scales


def dequantize_blockwise_dynamic(codes: torch.Tensor, scales: torch.Tensor, block: int = NF4_ABSMAX_BLOCK) -> torch.Tensor:
    values = dynamic_map_signed()[codes.long()]
    return values * scales.repeat_interleave(block)[:codes.numel()]


def pack_nibbles(codes: torch.Tensor, high_first: bool) -> torch.Tensor:
    """(..., 2n) uint8 codes in [0, 16) -> (..., n) bytes, element 2j in the high nibble if ``high_first``."""
    first, second = codes[..., 0::2], codes[..., 1::2]
    return (first << 4 | second) if high_first else (second << 4 | first)


def unpack_nibbles(packed: torch.Tensor, high_first: bool) -> torch.Tensor:
    high, low = packed >> 4, packed & 0x0F
    first, second = (high, low) if high_first else (low, high)
    return torch.stack([first, second], dim=-1).reshape(*packed.shape[:-1], -1)
