"""Documents in, chunks out: load text, Markdown and JSONL files (or a directory of them), then cut them into
pieces an encoder can embed whole.

    docs = load_documents("notes/")                     # .txt / .md / .markdown / .jsonl, recursively
    chunks = chunk_documents(docs, count_tokens, "tokens", size=128, overlap=32)
    chunks[0].text, chunks[0].doc_id, chunks[0].start, chunks[0].metadata

Every chunk is an exact slice ``doc.text[start:end]`` cut at word boundaries, so a citation can point back
into its document. ``count_tokens(text) -> int`` is the encoder tokenizer's count: "tokens" chunks hold at
most ``size`` of them (a single word longer than that is a chunk of its own), consecutive chunks share
about ``overlap`` tokens. "sentences" packs whole sentences up to ``size`` tokens; "headings" starts a new
chunk at every Markdown heading (recorded in the chunk's metadata) and packs each section's sentences.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import regex

from lmstack.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
CHUNKERS = ("tokens", "sentences", "headings")

_WORD = regex.compile(r"\S+")
_SENTENCE_END = regex.compile(r"(?<=[.!?…][\"')\]]*)\s+|\n\s*\n")
_HEADING = regex.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", regex.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One source text. ``id`` is unique within a corpus (a file's relative path, or a JSONL row's id)."""

    id: str
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: ``text == document.text[start:end]``; ``id`` is ``"{doc_id}#{index}"``."""

    doc_id: str
    index: int
    text: str
    start: int
    end: int
    metadata: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.doc_id}#{self.index}"


def load_documents(path: str | os.PathLike) -> list[Document]:
    """The documents of a file or of every supported file under a directory (sorted by path).

    A JSONL row is an object with a "text" string; its "id" (else ``file:line``) names it and its other keys
    become metadata. Every document also records its ``source`` file.

    Raises:
        DataError: a missing path, an unsupported file, a bad JSONL row (its line), or no text at all.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        base = root
    elif root.suffix.lower() in SUFFIXES:
        files, base = [root], root.parent
    else:
        raise DataError(f"{root}: not a supported document ({', '.join(SUFFIXES)})")
    documents = [doc for file in files for doc in _read_file(file, file.relative_to(base).as_posix())]
    documents = [doc for doc in documents if doc.text.strip()]
    if not documents:
        raise DataError(f"{root}: no text to index (empty, or no {', '.join(SUFFIXES)} files)")
    seen = set()
    for doc in documents:
        if doc.id in seen:
            raise DataError(f"{root}: two documents share the id {doc.id!r}; ids must be unique")
        seen.add(doc.id)
    return documents


def _read_file(file: Path, name: str) -> Iterable[Document]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if file.suffix.lower() != ".jsonl":
        yield Document(name, text, {"source": name})
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{file}:{number}: each row needs a \"text\" string")
        metadata = {k: v for k, v in row.items() if k not in ("id", "text")}
        yield Document(str(row.get("id", f"{name}:{number}")), row["text"], {"source": name, **metadata})


def chunk_documents(documents: Iterable[Document], count_tokens: Callable[[str], int], how: str = "tokens",
                    size: int = 128, overlap: int = 32) -> list[Chunk]:
    """Every document cut by ``how`` ("tokens", "sentences" or "headings"); see the module docstring."""
    if how not in CHUNKERS:
        raise ConfigError(f"unknown chunking {how!r}; choose one of {', '.join(CHUNKERS)}")
    if size < 1 or overlap < 0 or (how == "tokens" and overlap >= size):
        raise ConfigError(f"chunks need size >= 1 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    chunks = []
    for doc in documents:
        if how == "tokens":
            spans = [(s, e, {}) for s, e in token_spans(doc.text, count_tokens, size, overlap)]
        elif how == "sentences":
            spans = [(s, e, {}) for s, e in sentence_spans(doc.text, count_tokens, size)]
        else:
            spans = heading_spans(doc.text, count_tokens, size)
        for index, (start, end, extra) in enumerate(spans):
            chunks.append(Chunk(doc.id, index, doc.text[start:end], start, end, {**doc.metadata, **extra}))
    return chunks


def token_spans(text: str, count_tokens: Callable[[str], int], size: int, overlap: int,
                offset: int = 0) -> list[tuple[int, int]]:
    """(start, end) character spans of at most ``size`` tokens, each starting ~``overlap`` tokens before the
    previous one ended. Words are counted one by one (a word's tokens do not depend on its neighbours for
    WordPiece and for byte-level BPE with a leading-space pretokenizer)."""
    words = [(m.start() + offset, m.end() + offset, max(count_tokens(m.group()), 1)) for m in _WORD.finditer(text)]
    spans, first = [], 0
    while first < len(words):
        last, total = first, words[first][2]
        while last + 1 < len(words) and total + words[last + 1][2] <= size:
            last += 1
            total += words[last][2]
        spans.append((words[first][0], words[last][1]))
        if last + 1 >= len(words):
            break
        back, shared = last, 0  # step back over ~overlap tokens, always moving forward by at least one word
        while back > first + 1 and shared + words[back][2] <= overlap:
            shared += words[back][2]
            back -= 1
        first = back + 1 if shared else last + 1
    return spans


def sentence_spans(text: str, count_tokens: Callable[[str], int], size: int, offset: int = 0) -> list[tuple[int, int]]:
    """Whole sentences packed into spans of at most ``size`` tokens (a longer sentence is cut by tokens)."""
    spans, current = [], None  # current: [start, end, tokens]
    for start, end in _sentences(text):
        tokens = count_tokens(text[start:end])
        if tokens > size:
            if current:
                spans.append(tuple(current[:2]))
                current = None
            spans += token_spans(text[start:end], count_tokens, size, 0, offset + start)
            continue
        if current and current[2] + tokens <= size:
            current[1], current[2] = end + offset, current[2] + tokens
        else:
            if current:
                spans.append(tuple(current[:2]))
            current = [start + offset, end + offset, tokens]
    if current:
        spans.append(tuple(current[:2]))
    return spans


def heading_spans(text: str, count_tokens: Callable[[str], int], size: int) -> list[tuple[int, int, dict]]:
    """A Markdown text cut at its headings, each section packed by sentences; metadata {"heading": ...}."""
    bounds = [m.start() for m in _HEADING.finditer(text)]
    if not bounds or bounds[0] != 0:
        bounds.insert(0, 0)
    bounds.append(len(text))
    out = []
    for start, end in zip(bounds, bounds[1:]):
        heading = _HEADING.match(text, start)
        extra = {"heading": heading.group(1)} if heading else {}
        out += [(s, e, extra) for s, e in sentence_spans(text[start:end], count_tokens, size, start)]
    return out


def _sentences(text: str) -> Iterable[tuple[int, int]]:
    """(start, end) of each sentence, surrounding whitespace excluded."""
    start = 0
    for match in [*_SENTENCE_END.finditer(text), None]:
        end = match.start() if match else len(text)
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            yield start + lead, start + lead + len(stripped)
        if match:
            start = match.end()
