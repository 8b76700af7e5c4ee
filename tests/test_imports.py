"""Layering: each package imports only the layers below it; no reference library is imported at run time."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lmstack"
REFERENCE_LIBRARIES = {"transformers", "peft", "trl", "sentence_transformers", "tokenizers"}
# package -> lmstack packages it may import (besides itself and lmstack.errors)
ALLOWED = {
    "fileio": set(),
    "tokenizers": {"fileio", "native"},
    "native": set(),
    "nn": set(),
    "models": {"nn"},
    "checkpoints": {"models", "nn", "fileio", "tokenizers", "native"},  # a checkpoint holds its tokenizer
    "generate": {"models", "nn", "kernels"},
    "kernels": {"models", "nn", "native"},
    "recipes": {"nn", "models", "checkpoints", "generate", "config", "tokenizers", "data", "train", "rag", "eval",
                "kernels", "fileio", "compress", "peft", "align", "serve", "parallel", "agents"},
    "parallel": {"nn", "models", "config"},
    "compress": {"nn", "models", "kernels", "checkpoints", "fileio", "generate"},  # distillation samples
    "peft": {"nn", "models", "checkpoints", "fileio", "config"},
    "rag": {"models", "nn", "checkpoints", "tokenizers", "generate"},  # RAG generates the answer
    "agents": {"rag", "generate", "tokenizers"},
    "eval": set(),
    "data": {"tokenizers", "fileio"},
    "train": {"models", "nn", "data", "checkpoints", "config", "fileio", "eval"},
    "align": {"train", "peft", "generate", "data", "eval", "models", "nn"},
    "serve": {"generate", "models", "nn", "checkpoints", "tokenizers", "kernels"},
    "cli": {"recipes", "config"},
    "config": {"fileio"},
}
EXCEPTIONS: set[tuple[str, str]] = set()  # (file, package) pairs allowed beyond ALLOWED; none today


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


FILES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path):
    rel = path.relative_to(ROOT)
    package = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem in ALLOWED else None
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in REFERENCE_LIBRARIES, f"{rel} imports the test-only reference library {name}"
        if top != "lmstack" or package is None or name in ("lmstack", "lmstack.errors", "lmstack.lazy"):
            continue
        target = name.split(".")[1]
        allowed = ALLOWED[package] | {package} | {t for f, t in EXCEPTIONS if f == str(rel)}
        assert target in allowed, f"{rel} ({package}) must not import lmstack.{target}"


def test_tokenizers_do_not_need_torch():
    """lmstack.tokenizers runs in a process where torch was never imported."""
    import subprocess
    import sys

    code = "import sys, lmstack.tokenizers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
