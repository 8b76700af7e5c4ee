"""`lmstack rag index | query | ask | delete`: a persistent index of documents, searched and answered from.

    lmstack rag index docs/ --out runs/docs-index --chunking headings
    lmstack rag query runs/docs-index "how do I resume training?" --k 5 --hybrid
    lmstack rag ask runs/docs-index "how do I resume training?" --model smollm2-135m-instruct
    lmstack rag query runs/docs-index "resume" --mode bm25 --rerank path/to/cross-encoder
    lmstack rag delete runs/docs-index notes/old.md

The index records the encoder it was built with (``--encoder``, all-MiniLM-L6-v2 by default); query and ask
reopen that one, and refuse an ``--encoder`` that embeds differently.
"""

import json
from pathlib import Path

from lmstack.errors import ConfigError
from lmstack.rag import SentenceEncoder
from lmstack.rag.answering import Answer, stream_answer
from lmstack.rag.documents import load_documents
from lmstack.rag.rerank import CrossEncoder
from lmstack.rag.retrieve import Index
from lmstack.rag.store import ChunkStore
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.rag import RagAskConfig, RagDeleteConfig, RagIndexConfig, RagQueryConfig, parse_where
from lmstack.recipes.sampling import open_chat_model


def _encoder_name(name: str) -> str:
    """A bundled name as given; a directory as an absolute path (the index may be queried from elsewhere)."""
    return name if resolve_model_dir(name) != Path(name) else str(Path(name).resolve())


def open_index(path: Path, encoder: str | None) -> Index:
    """The index at ``path`` with the encoder it was built with (or ``encoder``, if it embeds the same)."""
    store = ChunkStore.open(path)
    name = encoder or store.meta["encoder"]
    try:
        return Index(store, SentenceEncoder(resolve_model_dir(name)))
    except Exception:
        store.close()
        raise


def _reranker(path: Path | None):
    return None if path is None else CrossEncoder(path)


def index(cfg: RagIndexConfig) -> Index:
    documents = load_documents(cfg.source)
    encoder = SentenceEncoder(resolve_model_dir(cfg.encoder))
    options = dict(chunking=cfg.chunking, size=cfg.chunk_size, overlap=cfg.overlap, batch_size=cfg.batch_size,
                   progress=cfg.progress)
    if cfg.update:
        built = Index(ChunkStore.open(cfg.out), encoder)
        added = built.add(documents, **options)
    else:
        if (cfg.out / "store.sqlite").exists():
            raise ConfigError(f"{cfg.out} already holds an index; pass --update to add to it")
        built = Index.build(cfg.out, documents, encoder, encoder_name=_encoder_name(cfg.encoder), **options)
        added = len(built)
    print(f"indexed {len(documents)} documents as {added} chunks into {cfg.out} "
          f"({len(built)} chunks, {len(built.store.documents())} documents in the index)")
    return built


def query(cfg: RagQueryConfig) -> list:
    found = open_index(cfg.index, cfg.encoder)
    if cfg.search != "exact":
        found = Index(found.store, found.encoder, cfg.search)
    hits = found.search(cfg.question, k=cfg.k, mode=cfg.mode, where=parse_where(cfg.where), fusion=cfg.fusion,
                        rerank=_reranker(cfg.rerank))
    for hit in hits:
        if cfg.json:
            print(json.dumps({"rank": hit.rank, "score": hit.score, "id": hit.chunk.id, "doc_id": hit.chunk.doc_id,
                              "start": hit.chunk.start, "end": hit.chunk.end, "metadata": hit.chunk.metadata,
                              "text": hit.chunk.text}))
        else:
            text = " ".join(hit.chunk.text.split())
            print(f"{hit.rank:>3}  {hit.score:8.4f}  {hit.chunk.id:<30}  {text[:100]}")
    if not hits:
        print("no matching chunks")
    return hits


def ask(cfg: RagAskConfig) -> Answer:
    found = open_index(cfg.index, cfg.encoder)
    result = None
    for piece in stream_answer(cfg.question, found, open_chat_model(cfg), k=cfg.k, mode=cfg.mode,
                               where=parse_where(cfg.where), max_new_tokens=cfg.max_new_tokens, fusion=cfg.fusion,
                               rerank=_reranker(cfg.rerank)):
        if isinstance(piece, Answer):
            result = piece
        else:
            print(piece, end="", flush=True)
    print()
    print("\nsources:")
    cited = {c.number for c in result.citations}
    for number, hit in enumerate(result.sources, 1):
        mark = "cited" if number in cited else "     "
        print(f"  [{number}] {mark}  {hit.chunk.id}  ({hit.chunk.start}-{hit.chunk.end})")
    if result.left_out:
        print(f"  ({len(result.left_out)} more retrieved but left out: they did not fit the context)")
    return result


def delete(cfg: RagDeleteConfig) -> int:
    store = ChunkStore.open(cfg.index)
    known = set(store.documents())
    missing = [i for i in cfg.ids if i not in known]
    if missing:
        raise ConfigError(f"{cfg.index} holds no document {missing[0]!r} (ids look like: "
                          f"{', '.join(sorted(known)[:3])})")
    removed = store.delete(cfg.ids)
    if cfg.compact:
        store.compact()
    print(f"removed {len(cfg.ids)} documents ({removed} chunks) from {cfg.index}")
    return removed
