"""lmstack: the whole large-language-model stack in one readable, tested PyTorch library.

Entry points:
    from lmstack.models import load_hf, save_hf, build_model, DecoderConfig, get_preset
"""

from lmstack.errors import CheckpointError, ConfigError, LmstackError

__version__ = "0.1.0"
__all__ = ["LmstackError", "ConfigError", "CheckpointError", "__version__"]
