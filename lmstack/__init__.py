"""lmstack: the whole large-language-model stack in one readable, tested PyTorch library.

Entry points:
    from lmstack import load_model, load_hf, save_hf      # HF directories and GGUF files <-> models
    from lmstack.models import build_model, DecoderConfig, get_preset
    from lmstack.tokenizers import load_tokenizer
    from lmstack.generate import generate, GenerationConfig

Importing ``lmstack`` itself imports no torch: the loaders are looked up on first use.
"""

from lmstack.errors import CheckpointError, ConfigError, LmstackError, TokenizerError

__version__ = "0.1.0"
_LOADERS = ("load_model", "load_hf", "save_hf", "load_gguf", "inspect_hf")


def __getattr__(name: str):
    if name in _LOADERS:
        import lmstack.checkpoints

        return getattr(lmstack.checkpoints, name)
    raise AttributeError(f"module 'lmstack' has no attribute {name!r}")


__all__ = ["LmstackError", "ConfigError", "CheckpointError", "TokenizerError", "__version__", *_LOADERS]
