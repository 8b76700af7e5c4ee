"""Calibrated int4: GPTQ and AWQ choose int4 codes from the activations of calibration text.

Both see each linear's inputs X (rows, in) from one forward pass of the fp32 model over the calibration
batches (hooks on every target linear), then quantize each layer on its own:

- **GPTQ** (Frantar et al., 2022): quantize the weight one column at a time and spread each column's
  rounding error over the columns not yet quantized, weighted by the inverse Hessian H = 2 XᵀX / n of the
  layer's squared output error. ``act_order`` visits columns by decreasing diag(H); the group scales and
  zero points are fixed from the original weight beforehand ("static groups"), so the stored layout is
  the same as round-to-nearest int4 and the kernels need nothing new.
- **AWQ** (Lin et al., 2023): scale input channel k of the weight by s_k = mean|x_k|^α (normalised by
  sqrt(max·min)), quantize W·s by round-to-nearest, and divide the input by s at run time
  (``input_scale``); α is chosen from a grid of 20 by the output error on the calibration inputs. Salient
  channels (large activations) get finer steps.
"""

import torch
from torch import nn

from lmstack.compress import formats

AWQ_GRID = 20
AWQ_SAMPLE_ROWS = 2048  # calibration rows kept per layer for AWQ's error measurement


class _InputStats:
    """Running statistics of one linear's inputs: XᵀX for GPTQ; mean |x| and a row sample for AWQ."""

    def __init__(self, in_features: int, method: str) -> None:
        self.method, self.rows = method, 0
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64) if method == "gptq" else None
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.sample: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.rows += x.shape[0]
        self.abs_sum += x.abs().sum(dim=0).double()
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()
        elif sum(s.shape[0] for s in self.sample) < AWQ_SAMPLE_ROWS:
            self.sample.append(x.clone())


def collect_input_stats(model: nn.Module, targets: dict[str, nn.Module], method: str,
                        calibration: list[torch.Tensor]) -> dict[str, _InputStats]:
    """One no-grad forward pass per calibration batch, recording every target's inputs."""
    stats = {name: _InputStats(module.in_features, method) for name, module in targets.items()}
    hooks = [module.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
             for name, module in targets.items()]
    try:
        with torch.no_grad():
            for batch in calibration:
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def calibrated_int4(model: nn.Module, targets: dict[str, nn.Module], method: str, group_size: int,
                    calibration: list[torch.Tensor], progress=None) -> dict[str, dict[str, torch.Tensor]]:
    """Name -> int4 tensors (``formats.quantize_int4``'s, plus ``input_scale`` for AWQ) for each target."""
    stats = collect_input_stats(model, targets, method, calibration)
    chosen = {}
    for i, (name, module) in enumerate(targets.items()):
        weight = module.weight.detach().float()
        if method == "gptq":
            chosen[name] = gptq_int4(weight, stats[name].xtx * (2.0 / stats[name].rows), group_size)
        else:
            sample = torch.cat(stats[name].sample)[:AWQ_SAMPLE_ROWS]
            chosen[name] = awq_int4(weight, sample, (stats[name].abs_sum / stats[name].rows).float(), group_size)
        del stats[name]  # free each Hessian once used
        if progress is not None:
            progress(i + 1, len(targets))
    return chosen


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, block_size: int = 128,
              damp: float = 0.01, act_order: bool = True) -> dict[str, torch.Tensor]:
    """GPTQ codes for ``weight`` (out, in) given the Hessian (in, in) of its inputs."""
    W = weight.clone().double()
    H = hessian.clone().double()
    scales, zeros = formats.int4_params(weight, group_size)  # static groups from the original weight
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(H.shape[0])
    W, H = W[:, order], H[order][:, order]
    # The upper Cholesky factor of H^-1 gives each step's inverse-Hessian row without re-inverting.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    col_scale = scales.double()[:, order // group_size]
    col_zero = zeros.double()[:, order // group_size]
    codes = torch.zeros_like(W)
    for start in range(0, W.shape[1], block_size):
        stop = min(start + block_size, W.shape[1])
        W1, errors, Hinv1 = W[:, start:stop].clone(), torch.zeros_like(W[:, start:stop]), Hinv[start:stop, start:stop]
        for i in range(stop - start):
            w, s, z = W1[:, i], col_scale[:, start + i], col_zero[:, start + i]
            code = torch.clamp(torch.round(w / s) + z, -8, 7)
            codes[:, start + i] = code
            error = (w - (code - z) * s) / Hinv1[i, i]
            W1[:, i:] -= error[:, None] * Hinv1[i, i:][None, :]
            errors[:, i] = error
        W[:, stop:] -= errors @ Hinv[start:stop, stop:]
    original_order = torch.empty_like(codes)
    original_order[:, order] = codes
    return formats.quantize_int4(weight, group_size, scales, zeros, original_order.float())


def awq_int4(weight: torch.Tensor, x: torch.Tensor, x_mean_abs: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """AWQ: the channel scaling of the grid with the least output error on ``x`` (rows, in)."""
    reference = x @ weight.T
    best, best_error = None, float("inf")
    for i in range(AWQ_GRID):
        s = x_mean_abs.pow(i / AWQ_GRID).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        tensors = formats.quantize_int4(weight * s, group_size)
        output = (x / s) @ formats.dequantize_int4(tensors, group_size).T
        error = (output - reference).pow(2).mean().item()
        if error < best_error:
            best, best_error = {**tensors, "input_scale": 1.0 / s}, error
    return best
