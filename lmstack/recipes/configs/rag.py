"""What `lmstack rag index | query | ask | delete` take."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import field
from lmstack.errors import ConfigError
from lmstack.recipes.configs.sampling import ChatModelOptions

ENCODER_HELP = "sentence encoder directory, or all-minilm-l6-v2 (the bundled package)"


def parse_where(pairs: list[str]) -> dict:
    """["topic=peft", "source=a.md"] -> {"topic": ["peft"], "source": ["a.md"]} (a repeated key: any of)."""
    where: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where takes KEY=VALUE, got {pair!r}")
        where.setdefault(key, []).append(value)
    return where


@dataclass
class RagIndexConfig:
    """Build a persistent search index of documents (text, Markdown, JSONL, or a directory of them)."""

    source: Path = field(help="a file or a directory of .txt / .md / .jsonl files", positional=True)
    out: Path = field(help="index directory to create (or, with --update, to add to)")
    encoder: str = field("all-minilm-l6-v2", help=ENCODER_HELP)
    chunking: Literal["tokens", "sentences", "headings"] = field(
        "tokens", help="how documents are cut: windows of tokens with overlap, whole sentences, Markdown sections")
    chunk_size: int = field(128, help="most encoder tokens in a chunk")
    overlap: int = field(32, help="tokens consecutive chunks share (--chunking tokens)")
    batch_size: int = field(64, help="chunks per encoder forward pass")
    update: bool = field(False, help="add to an existing index: documents it already holds are replaced")
    progress: bool = field(True, help="show a progress bar")


@dataclass
class RagQueryConfig:
    """Search an index: dense (embeddings), BM25 or hybrid (the two fused), optionally re-ranked."""

    index: Path = field(help="index directory (lmstack rag index)", positional=True)
    question: str = field(help="the query", positional=True)
    k: int = field(5, help="results to return")
    mode: Literal["dense", "bm25", "hybrid"] = field("dense", help="how chunks are ranked")
    hybrid: bool = field(False, help="shorthand for --mode hybrid")
    fusion: Literal["relative", "rrf"] = field("relative", help="hybrid fusion: 0.75 dense + 0.25 BM25 scores "
                                                "scaled to [0, 1], or reciprocal-rank fusion")
    rerank: Path | None = field(None, help="cross-encoder checkpoint (BertForSequenceClassification) that "
                                "re-scores the top 50")
    where: list[str] = field(default_factory=list, help="metadata filters KEY=VALUE ... (one --where; a key "
                             "given twice matches any of its values)")
    search: Literal["exact", "ivf", "faiss-flat", "faiss-hnsw"] = field(
        "exact", help="dense search structure: exact, IVF (approximate), or faiss when installed")
    encoder: str | None = field(None, help="override the encoder recorded in the index (it must embed the same)")
    json: bool = field(False, help="print one JSON object per hit instead of a table")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"--k {self.k} must be at least 1")
        if self.hybrid:
            self.mode = "hybrid"
        parse_where(self.where)


@dataclass(kw_only=True)
class RagAskConfig(ChatModelOptions):
    """Answer a question from an index with a chat model, citing the sources it used."""

    index: Path = field(help="index directory (lmstack rag index)", positional=True)
    question: str = field(help="the question", positional=True)
    k: int = field(4, help="sources to retrieve (as many as fit the context are used)")
    mode: Literal["dense", "bm25", "hybrid"] = field("hybrid", help="how sources are ranked")
    fusion: Literal["relative", "rrf"] = field("relative", help="hybrid fusion (see lmstack rag query --help)")
    rerank: Path | None = field(None, help="cross-encoder checkpoint that re-scores the retrieved sources")
    where: list[str] = field(default_factory=list, help="metadata filters KEY=VALUE")
    max_new_tokens: int = field(256, help="most tokens in the answer")
    encoder: str | None = field(None, help="override the encoder recorded in the index")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError(f"--k {self.k} must be at least 1")
        parse_where(self.where)


@dataclass
class RagDeleteConfig:
    """Remove documents (by id: a file's path inside the indexed directory, or a JSONL row's id) from an index."""

    index: Path = field(help="index directory", positional=True)
    ids: list[str] = field(help="document ids to remove", positional=True)
    compact: bool = field(True, help="then rewrite the vector file without them")
