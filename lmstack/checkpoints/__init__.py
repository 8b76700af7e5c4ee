"""Checkpoint I/O: Hugging Face-format directories (load_hf / save_hf), GGUF files (load_gguf), and
``load_model`` for either.

    from lmstack.checkpoints import load_model
    model = load_model("dir")            # config.json + *.safetensors
    model = load_model("model.gguf")     # llama.cpp's format, dequantised
"""

import os
from pathlib import Path

import torch
from torch import nn

from lmstack.checkpoints.hf import inspect_hf, is_finite, load_hf, resolve_dtype, save_hf
from lmstack.checkpoints.io import index_checkpoint, load_tensors
from lmstack.nn.transforms import Transform, apply_transforms


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a GGUF file (by its magic bytes, not its name)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "auto", transforms: list[Transform] = ()) -> nn.Module:
    """The model in ``path``: a Hugging Face-format directory or a ``.gguf`` file, in eval mode, with
    ``transforms`` applied (see ``load_hf``; a GGUF file is dequantised first, then transformed).

    Raises:
        CheckpointError, ConfigError: see ``load_hf`` and ``load_gguf``.
    """
    if is_gguf(path):
        from lmstack.checkpoints.gguf import load_gguf  # imports the gguf package only when needed

        model = load_gguf(path, device=device, dtype=dtype)
        return apply_transforms(model, transforms).eval()
    return load_hf(path, device=device, dtype=dtype, transforms=transforms)


def non_finite_tensors(path: str | os.PathLike) -> list[str]:
    """The stored names of the tensors in ``path`` (HF directory or .gguf) that hold NaN or inf. Reads every
    weight once, one tensor at a time (safetensors memory-mapped; GGUF tensors dequantised one by one)."""
    if is_gguf(path):
        from lmstack.checkpoints.gguf import read_gguf

        return [name for name, tensor in read_gguf(path).tensors.items() if not is_finite(tensor.to_torch())]
    by_file: dict[Path, list[str]] = {}
    for info in index_checkpoint(Path(path)).values():  # every stored tensor, quantized checkpoints' too
        by_file.setdefault(info.file, []).append(info.name)
    return [name for file, names in by_file.items() for name, tensor in load_tensors(file, names)
            if not is_finite(tensor)]


def load_gguf(path: str | os.PathLike, **options) -> nn.Module:
    """See ``lmstack.checkpoints.gguf.load_gguf``."""
    from lmstack.checkpoints.gguf import load_gguf as load

    return load(path, **options)


__all__ = ["inspect_hf", "is_gguf", "load_gguf", "load_hf", "load_model", "non_finite_tensors", "resolve_dtype",
           "save_hf"]
