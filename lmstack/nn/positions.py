"""Positional encodings: sinusoidal, learned absolute, rotary (RoPE) with scaling, and ALiBi.

RoPE: Su et al. 2021, https://arxiv.org/abs/2104.09864 (rotate-half layout, as Hugging Face/Llama use).
RoPE scaling: linear (Chen et al. 2023), dynamic NTK (bloc97/emozilla 2023), Llama 3.1 frequency bands,
YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071).
ALiBi: Press et al. 2021, https://arxiv.org/abs/2108.12409.
Shapes: B batch, T time, H heads, D head dim.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmstack.errors import ConfigError


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position embeddings of "Attention Is All You Need" (no parameters)."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ConfigError(f"sinusoidal positions need an even dim, got {dim}")
        self.dim, self.base = dim, base

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: (B, T) integer -> (B, T, dim) float32 embeddings."""
        # Frequency i is base^(-2i/dim); even channels take sin, odd channels cos.
        freqs = self.base ** (-torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32) / self.dim)
        angles = positions.float().unsqueeze(-1) * freqs  # (B, T, dim/2)
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings (GPT-2's ``wpe``): a table of ``max_positions`` vectors."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: (B, T) integer -> (B, T, dim)."""
        limit = self.weight.shape[0]
        if positions.numel() and int(positions.max()) >= limit:
            raise ValueError(f"position {int(positions.max())} is beyond the {limit} learned positions (context length)")
        return nn.functional.embedding(positions, self.weight)


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched to reach past the trained context.

    kind: "linear" divides every frequency by ``factor``; "dynamic" raises the base once a sequence
    is longer than ``max_positions`` (NTK-aware); "llama3" divides low frequencies by ``factor``,
    keeps high ones and interpolates between (Llama 3.1); "yarn" blends interpolated and original
    frequencies over a ramp between ``beta_fast`` and ``beta_slow`` rotations and scales cos/sin by
    an attention factor.
    """

    kind: Literal["linear", "dynamic", "llama3", "yarn"]
    factor: float
    original_max_positions: int | None = None  # llama3, yarn: the context the model was pretrained with
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    attention_factor: float | None = None  # yarn: cos/sin scale; default from factor (and mscale)
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn (DeepSeek style attention factor)
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the ramp bounds to whole dimensions

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "dynamic", "llama3", "yarn"):
            raise ConfigError(f"rope_scaling.kind={self.kind!r} is not supported; expected linear, dynamic, llama3 "
                              "or yarn")
        if not self.factor > 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.kind in ("llama3", "yarn") and not self.original_max_positions:
            raise ConfigError(f"rope_scaling kind {self.kind!r} needs original_max_positions")
        if self.kind == "llama3":
            if self.high_freq_factor <= self.low_freq_factor:
                raise ConfigError("rope_scaling.high_freq_factor must exceed low_freq_factor")

    @property
    def cos_sin_scale(self) -> float:
        """Factor applied to cos and sin: 1 except for YaRN's attention temperature."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Unscaled RoPE inverse frequencies theta^(-2i/D), shape (D/2,) float32."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth ramp between."""
    old_len = s.original_max_positions
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_inv_freq(head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN: original frequencies for dimensions that rotate fast (more than beta_fast turns over the
    trained context), interpolated ones (divided by factor) for slow ones, a linear ramp between."""

    def correction_dim(rotations: float) -> float:  # the dimension that turns ``rotations`` times
        return head_dim * math.log(s.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    interpolation = extrapolation / s.factor
    keep_original = 1 - ramp
    return interpolation * (1 - keep_original) + extrapolation * keep_original


class RotaryEmbedding(nn.Module):
    """Computes RoPE cos/sin tables for given positions; holds no parameters or buffers.

    Frequencies are recomputed per call (D/2 numbers: negligible) so the module works on a meta-device
    model and never carries a stale buffer across devices.

    Args:
        head_dim: D, the per-head width rotated (must be even).
        theta: RoPE base.
        scaling: optional RopeScaling.
        max_positions: trained context length; dynamic scaling starts beyond it.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None,
                 max_positions: int = 2048) -> None:
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta, self.scaling, self.max_positions = head_dim, theta, scaling, max_positions

    def inv_freq(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        """Inverse frequencies (D/2,) for a call whose largest position is ``seq_len - 1``."""
        s, theta, d = self.scaling, self.theta, self.head_dim
        if s is not None and s.kind == "dynamic" and seq_len > self.max_positions:
            # NTK-aware: grow the base so the lowest frequency still spans the longer sequence.
            theta = theta * ((s.factor * seq_len / self.max_positions) - (s.factor - 1)) ** (d / (d - 2))
        inv_freq = rope_inv_freq(d, theta, device)
        if s is not None and s.kind == "linear":
            inv_freq = inv_freq / s.factor
        elif s is not None and s.kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, s)
        elif s is not None and s.kind == "yarn":
            inv_freq = yarn_inv_freq(d, theta, s).to(inv_freq.device)
        return inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, T) integer -> (cos, sin), each (B, T, D) float32."""
        seq_len = 0
        if self.scaling is not None and self.scaling.kind == "dynamic" and positions.numel():
            seq_len = int(positions.max()) + 1  # only dynamic NTK needs it: skip the host read-back otherwise
        inv_freq = self.inv_freq(seq_len, positions.device)
        angles = positions.float().unsqueeze(-1) * inv_freq  # (B, T, D/2)
        emb = torch.cat((angles, angles), dim=-1)  # rotate-half layout: first and second halves pair up
        scale = self.scaling.cos_sin_scale if self.scaling is not None else 1.0
        return emb.cos() * scale, emb.sin() * scale

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys. x: (B, H, T, D); cos, sin: (B, T, D) -> (B, H, T, D), dtype of x."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (H,): a geometric sequence 2^(-8/n), interleaved when H is not a power of 2."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two_slopes(closest)
    if closest != n_heads:
        # The paper's recipe: take every other slope of the next power of two for the extra heads.
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, n_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of ``relative = key_pos - query_pos`` into ``n_buckets`` ids (Raffel et al. 2020).

    Half the buckets hold exact small distances, the other half logarithmically wider ranges up to
    ``max_distance``; farther distances share the last bucket. Bidirectional (encoder) buckets split
    into keys before and after the query; causal (decoder) buckets cover keys before it only.
    """
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets += (relative > 0).long() * n_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp_min(0)
    max_exact = n_buckets // 2
    # log-spaced buckets for distance >= max_exact (the float division is T5's, kept for exact parity)
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (n_buckets - max_exact)).long()
    large = large.clamp_max(n_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head score bias indexed by T5 relative-position buckets.

    Args:
        n_buckets: buckets (T5: 32); max_distance: distance where buckets stop growing (T5: 128).
        n_heads: H; bidirectional: True for the encoder, False for the causal decoder.
    """

    def __init__(self, n_buckets: int, max_distance: int, n_heads: int, bidirectional: bool) -> None:
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(n_buckets, n_heads))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """q_positions: (Tq,), k_positions: (Tk,) integer -> bias (1, H, Tq, Tk)."""
        relative = k_positions[None, :] - q_positions[:, None]  # (Tq, Tk)
        buckets = relative_position_bucket(relative, self.bidirectional, self.n_buckets, self.max_distance)
        return nn.functional.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)
