"""Weight memory backed by 2 MiB transparent huge pages, for CPU inference.

A decoding step streams ~every weight once; with 4 KiB pages (or weights still mapped from a file)
address translation, not DRAM, becomes the limit (measured: ~20% slower decoding). ``hugepage_tensors``
carves float32 tensors out of one private anonymous mapping advised for huge pages and faulted in by a
multi-threaded ``zero_`` up front (taking the faults one at a time during a copy was several times slower
here, and a single ``MADV_POPULATE_WRITE`` call about 2x slower, on 2 cores).
Loaders that produce weights tensor by tensor (GGUF dequantisation) write straight into it, so the
weights are never held twice; ``in_hugepages`` tells a later caller not to copy them again.
"""

import mmap

import torch

HUGE_PAGE = 2 * 2**20
_ALIGN = 4096  # each tensor starts on a page boundary
_ARENAS: list[tuple[int, int]] = []  # (start, end) addresses of the mappings made here


def hugepages_available() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE")


def hugepage_tensors(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype] | None = None) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of ``shapes`` (float32, or ``dtypes``), all in one huge-page mapping (kept
    alive by them)."""
    dtypes = dtypes or [torch.float32] * len(shapes)
    sizes = [_numel(s) * d.itemsize for s, d in zip(shapes, dtypes)]
    spans = [-(-max(1, n) // _ALIGN) * _ALIGN for n in sizes]
    # Private anonymous memory: a shared mapping (mmap's default) is shmem, which THP leaves alone.
    # Whole huge pages from the first 2 MiB boundary on: one page of slack for the alignment.
    size = -(-sum(spans) // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE
    arena = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # every view keeps the mapping alive
    memory.zero_()  # fault the pages in on all threads at once (faster here than MADV_POPULATE_WRITE)
    offset = -memory.data_ptr() % HUGE_PAGE
    _ARENAS.append((memory.data_ptr(), memory.data_ptr() + memory.numel()))
    tensors = []
    for shape, dtype, n, span in zip(shapes, dtypes, sizes, spans):
        tensors.append(memory[offset:offset + n].view(dtype).view(shape))
        offset += span
    return tensors


@torch.no_grad()
def move_to_hugepages_(params: list[torch.nn.Parameter]) -> None:
    """Copy CPU fp32 parameters into one huge-page mapping, skipping those already in one. Each Parameter
    keeps its identity (only ``.data`` moves), so tied weights stay tied. A no-op where the platform has
    no MADV_HUGEPAGE."""
    unique = list({id(p): p for p in params if p.device.type == "cpu" and p.dtype == torch.float32
                   and not in_hugepages(p)}.values())
    if not unique or not hugepages_available():
        return
    for param, view in zip(unique, hugepage_tensors([tuple(p.shape) for p in unique])):
        view.copy_(param.data)
        param.data = view


@torch.no_grad()
def move_buffers_to_hugepages_(module: torch.nn.Module, min_bytes: int = 1 << 16) -> None:
    """Copy the large CPU buffers of ``module``'s tree (a quantized layer's codes and scales) into one
    huge-page mapping. A buffer several modules hold (a quantized table shared by the embedding and a tied
    head) moves once and stays shared. A no-op where the platform has no MADV_HUGEPAGE."""
    holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if (buffer is None or buffer.device.type != "cpu" or not buffer.is_contiguous() or in_hugepages(buffer)
                    or buffer.numel() * buffer.element_size() < min_bytes):
                continue
            key = buffer.data_ptr()
            holders.setdefault(key, []).append((owner, name))
            tensors.setdefault(key, buffer)
    if not tensors or not hugepages_available():
        return
    unique = list(tensors.values())
    for key, view in zip(tensors, hugepage_tensors([tuple(t.shape) for t in unique], [t.dtype for t in unique])):
        view.copy_(tensors[key])
        for owner, name in holders[key]:
            owner._buffers[name] = view


def in_hugepages(tensor: torch.Tensor) -> bool:
    """True if ``tensor``'s data lies in a mapping made by ``hugepage_tensors``."""
    address = tensor.data_ptr()
    return any(start <= address < end for start, end in _ARENAS)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def release_freed_memory() -> bool:
    """Hand memory the allocator keeps after frees back to the system (glibc's ``malloc_trim``); True if done.

    Why: replacing a model's fp32 weights by quantized codes frees hundreds of MB, but glibc keeps large freed
    blocks in its heap (its mmap threshold grows after each big free), so the process's resident set would
    stay as if the fp32 weights were still there, and a QLoRA run would look no smaller than LoRA.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):  # not glibc
        return False


def unmap_large_frees(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more by mmap, and unmap them when freed
    (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc from raising that threshold after big frees).

    Why: training allocates and frees activation-sized tensors all the time; by default glibc soon keeps
    such blocks in its heap, and the resident set holds the high-water mark of every fragment. Measured on
    SmolLM2 QLoRA with activation checkpointing: peak RSS 1356 -> 912 MiB, for about 15% more time per
    step (fresh pages are faulted in again). True if set (glibc only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).mallopt(-3, int(threshold))) if name else False  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
