"""Checkpoint I/O: Hugging Face-format directories (load_hf / save_hf) and safe safetensors helpers."""

from lmstack.checkpoints.hf import inspect_hf, load_hf, resolve_dtype, save_hf

__all__ = ["inspect_hf", "load_hf", "resolve_dtype", "save_hf"]
