"""Decode attention over a paged KV pool, read in place (``csrc/paged_attention.cpp``).

The eager reference is ``lmstack.serve.paged_kv.PackedBatch``'s gather-then-attend path; the kernel is used
where it applies (fp32 on CPU, no ALiBi, inference) and gives the same result up to float summation order.
"""

import torch

from lmstack.kernels.build import load_cpu_kernels


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                           lengths: torch.Tensor, window: int | None, scale: float) -> torch.Tensor | None:
    """q (G, H, D); k_pool, v_pool (slots, Hkv, D); slots (G, Kmax) int64; lengths (G,) -> (G, H, D), or None
    where the kernel does not apply (the caller then takes the eager path)."""
    kernels = load_cpu_kernels()
    if (kernels is None or torch.is_grad_enabled() or q.device.type != "cpu" or q.dtype is not torch.float32
            or k_pool.dtype is not torch.float32):
        return None
    return kernels.paged_decode_attention(q.contiguous(), k_pool, v_pool, slots, lengths, window or 0, scale)
