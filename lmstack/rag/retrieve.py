"""Build, update and search an index: dense (embeddings), BM25, or both fused (hybrid).

    index = Index.build("my-index", load_documents("notes/"), encoder, chunking="sentences", size=128)
    hits = index.search("how do I resume training?", k=5, mode="hybrid", where={"source": "train.md"})
    hits[0].chunk.text, hits[0].score, hits[0].chunk.doc_id
    index = Index.open("my-index", encoder)        # refused if the encoder is not the one it was built with

Dense search ranks chunks by cosine similarity with the query's embedding (``lmstack.rag.index``), BM25 by
lexical overlap (``lmstack.rag.bm25``; English stop words ignored unless ``stopwords=()``). Hybrid fuses
the two: by default with relative-score fusion, 0.75 · dense + 0.25 · BM25, the cosines min-max scaled over
the candidates and the BM25 scores divided by the best one (0 already means "no shared term"; min-max would
zero the last lexical match, which decides short lists). Bruch et al. (2023) find such convex combinations
beat rank fusion; the weight is Weaviate's default, not tuned on our benchmark. Or with reciprocal-rank
fusion (``fusion="rrf"``), score(c) = Σ_rankings 1 / (60 + rank(c)), which ignores the scores and weighs
both rankings equally.
"""

import os
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmstack.errors import CheckpointError, ConfigError, DataError
from lmstack.rag.bm25 import BM25, ENGLISH_STOPWORDS, tokenize
from lmstack.rag.documents import Chunk, Document, chunk_documents
from lmstack.rag.index import ExactIndex, IVFIndex, build_index, default_lists, train_centroids
from lmstack.rag.rerank import rerank_order
from lmstack.rag.store import ChunkStore

MODES = ("dense", "bm25", "hybrid")
IVF_FILE = "ivf-centroids.safetensors"  # the trained IVF lists, beside the store
FUSIONS = ("relative", "rrf")
RRF_K = 60  # Cormack et al. (2009): the constant that damps the top ranks' weight
DENSE_WEIGHT = 0.75  # relative-score fusion's default dense share (Weaviate's hybrid default; not tuned here)
_PROBE = "lmstack index fingerprint: the quick brown fox jumps over the lazy dog."


@dataclass(frozen=True)
class Hit:
    """One search result: the chunk, its score under the mode searched, and its 1-based rank."""

    chunk: Chunk
    score: float
    rank: int


def reciprocal_rank_fusion(rankings: Iterable[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse rankings (lists of ids, best first) into one: (id, Σ 1/(k + rank)) sorted best first (ties keep
    first-seen order)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


def relative_score_fusion(results: list[tuple[list[int], list[float]]], weights: list[float],
                          floors: list[float | None] | None = None) -> list[tuple[int, float]]:
    """Fuse scored result lists: each list's scores scaled to [0, 1] as (score - floor) / (max - floor), then
    Σ weight · scaled score (an item absent from a list gets 0 from it); sorted best first (ties keep
    first-seen order). A list's floor is the score that means "no evidence": given (BM25's is 0, no shared
    term) or, where None, the list's lowest score (min-max scaling, for cosine similarities)."""
    floors = floors or [None] * len(results)
    fused: dict[int, float] = {}
    for (items, scores), weight, floor in zip(results, weights, floors):
        if not items:
            continue
        low, high = (min(scores) if floor is None else floor), max(scores)
        for item, score in zip(items, scores):
            scaled = (score - low) / (high - low) if high > low else 1.0
            fused[item] = fused.get(item, 0.0) + weight * scaled
    return sorted(fused.items(), key=lambda kv: -kv[1])


def encoder_fingerprint(encoder) -> list[float]:
    """The first 16 components of the encoder's embedding of a fixed sentence: tells embedding models apart."""
    return [round(x, 6) for x in encoder.encode([_PROBE])[0, :16].tolist()]


class Index:
    """A ChunkStore searched with one encoder (see the module docstring)."""

    def __init__(self, store: ChunkStore, encoder, kind: str = "exact", *, stopwords=ENGLISH_STOPWORDS,
                 **index_options) -> None:
        """``stopwords``: the words BM25 ignores (``()``: none); ``index_options`` go to the dense index."""
        self.store, self.encoder, self.kind, self.index_options = store, encoder, kind, index_options
        self.stopwords = stopwords
        self._check_encoder()
        self._load()

    # --- building ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, directory: str | os.PathLike, documents: list[Document], encoder, *, encoder_name: str,
              chunking: str = "tokens", size: int = 128, overlap: int = 32, batch_size: int = 64,
              progress: bool = False) -> "Index":
        """A new index of ``documents`` in ``directory``."""
        store = ChunkStore.create(directory, encoder_name=encoder_name, fingerprint=encoder_fingerprint(encoder),
                                  dim=encoder.dim)
        index = cls(store, encoder)
        index.add(documents, chunking=chunking, size=size, overlap=overlap, batch_size=batch_size, progress=progress)
        return index

    @classmethod
    def open(cls, directory: str | os.PathLike, encoder, kind: str = "exact", *, stopwords=ENGLISH_STOPWORDS,
             **index_options) -> "Index":
        return cls(ChunkStore.open(directory), encoder, kind, stopwords=stopwords, **index_options)

    def add(self, documents: list[Document], *, chunking: str = "tokens", size: int = 128, overlap: int = 32,
            batch_size: int = 64, progress: bool = False) -> int:
        """Chunk, embed and store ``documents`` (a document already present is replaced); returns the number of
        chunks added. Each group of whole documents commits on its own, so a killed run keeps what it finished."""
        limit = self.encoder.max_length - 2  # [CLS] and [SEP]
        if size > limit:
            raise ConfigError(f"chunks of {size} tokens would be truncated: the encoder reads {limit} tokens "
                              "besides its special tokens; lower the chunk size")
        chunks = chunk_documents(documents, self.count_tokens, chunking, size, overlap)
        if not chunks:
            raise DataError("no text to index: every document is empty")
        groups, group = [], []
        for chunk in chunks:  # ~4 batches a commit, never splitting a document
            if group and len(group) >= 4 * batch_size and chunk.doc_id != group[-1].doc_id:
                groups.append(group)
                group = []
            group.append(chunk)
        groups.append(group)
        with tqdm(total=len(chunks), desc="indexing", unit="chunk", disable=not progress) as bar:
            for group in groups:
                self.store.add(group, self.encoder.encode([c.text for c in group], batch_size=batch_size))
                bar.update(len(group))
        self._load()
        return len(chunks)

    def delete(self, doc_ids: list[str]) -> int:
        """Remove documents (by id); returns the number of chunks removed."""
        removed = self.store.delete(doc_ids)
        self._load()
        return removed

    # --- searching -----------------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.encoder.tokenizer.encode(text, add_special_tokens=False))

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, query: str, k: int = 5, mode: str = "dense", where: dict | None = None,
               depth: int | None = None, fusion: str = "relative", alpha: float = DENSE_WEIGHT,
               rerank=None) -> list[Hit]:
        """The ``k`` best chunks for ``query``. ``where`` keeps chunks whose metadata equals each value given
        (a list value: any of them). Hybrid fuses the dense and BM25 top-``depth`` (default max(50, 4k)) by
        ``fusion``: "relative" (alpha · dense + (1 - alpha) · BM25, each scaled to [0, 1]) or "rrf".
        ``rerank`` (``lmstack.rag.rerank``: a CrossEncoder or EmbeddingReranker) rescores the ``mode``'s top
        ``depth`` and keeps its ``k`` best; the hits then carry the re-ranker's scores."""
        if mode not in MODES:
            raise ConfigError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"k={k!r} must be a positive integer")
        if not query.strip():
            raise DataError("the query is empty")
        if fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        depth = depth or max(50, 4 * k)
        positions, scores = self._rank(query, depth if rerank is not None else k, mode, self._allowed(where),
                                       depth, fusion, alpha)
        chunks = self.store.chunks([self.rows[p] for p in positions])
        if rerank is not None:
            scores = rerank.rerank(query, [c.text for c in chunks])
            order = rerank_order(scores)[:k]
            chunks, scores = [chunks[i] for i in order], [scores[i] for i in order]
        return [Hit(c, s, rank) for rank, (c, s) in enumerate(zip(chunks, scores), 1)]

    def _rank(self, query: str, k: int, mode: str, allowed, depth: int, fusion: str, alpha: float
              ) -> tuple[list[int], list[float]]:
        """Row positions and scores of the ``k`` best chunks under ``mode``."""
        if mode != "hybrid":
            return (self._dense if mode == "dense" else self._bm25)(query, k, allowed)
        depth = max(depth, k)
        results = [self._dense(query, depth, allowed), self._bm25(query, depth, allowed)]
        fused = (reciprocal_rank_fusion([items for items, _ in results]) if fusion == "rrf"
                 else relative_score_fusion(results, [alpha, 1.0 - alpha], floors=[None, 0.0]))
        return [p for p, _ in fused[:k]], [s for _, s in fused[:k]]

    def embed_query(self, query: str) -> torch.Tensor:
        tokens = self.count_tokens(query)
        if tokens > self.encoder.max_length - 2:
            raise DataError(f"the query is {tokens} tokens; the encoder reads at most {self.encoder.max_length - 2} "
                            "(shorten it: the rest would be silently cut off)")
        return self.encoder.encode([query])

    def _dense(self, query: str, k: int, allowed) -> tuple[list[int], list[float]]:
        scores, positions = self.dense_index.search(self.embed_query(query), k, allowed)
        keep = positions[0] >= 0
        return positions[0][keep].tolist(), scores[0][keep].tolist()

    def _bm25(self, query: str, k: int, allowed) -> tuple[list[int], list[float]]:
        if self._lexical is None:
            self._lexical = BM25([tokenize(c.text, self.stopwords) for c in self.store.chunks(self.rows)])
        scores = torch.from_numpy(self._lexical.scores(tokenize(query, self.stopwords)))
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        best, positions = scores.topk(min(k, len(scores)))
        keep = best > 0  # no shared term, no lexical match
        return positions[keep].tolist(), best[keep].tolist()

    def _allowed(self, where: dict | None) -> torch.Tensor | None:
        if not where:
            return None
        wanted = {key: set(v) if isinstance(v, (list, tuple, set)) else {v} for key, v in where.items()}
        return torch.tensor([all(m.get(key) in values for key, values in wanted.items()) for m in self._metadata],
                            dtype=torch.bool)

    # --- internals -----------------------------------------------------------------------------------------

    def _check_encoder(self) -> None:
        name = self.store.meta["encoder"]
        if self.encoder.dim != self.store.dim or not torch.allclose(
                torch.tensor(encoder_fingerprint(self.encoder)), torch.tensor(self.store.fingerprint), atol=1e-3):
            raise ConfigError(f"{self.store.directory} was built with the embedding model {name!r} "
                              f"(dim {self.store.dim}); this encoder (dim {self.encoder.dim}) embeds differently: "
                              f"query it with {name!r}, or rebuild the index")

    def _load(self) -> None:
        """The live rows, their metadata and the search structures (rebuilt after every change)."""
        self.rows = self.store.live_rows()
        self._metadata = [c.metadata for c in self.store.chunks(self.rows)]
        vectors = self.store.vectors(self.rows)
        if self.kind == "ivf" and len(vectors):
            options = dict(self.index_options)
            if options.get("centroids") is None:  # lists given by the caller are used as they are
                options["centroids"] = self._ivf_centroids(vectors)
            self.dense_index = IVFIndex(vectors, **options)
        elif self.kind != "exact" and len(vectors):
            self.dense_index = build_index(vectors, self.kind, **self.index_options)
        else:
            self.dense_index = ExactIndex(vectors)
        self._lexical = None  # built on the first BM25 query

    def _ivf_centroids(self, vectors: torch.Tensor) -> torch.Tensor:
        """The IVF lists saved beside the store (trained on first use, then kept as rows are added and deleted,
        as faiss keeps a trained IVF); trained again when another ``n_lists`` is asked for."""
        path = self.store.directory / IVF_FILE
        wanted = self.index_options.get("n_lists")
        if path.is_file():
            try:
                centroids = load_file(path)["centroids"]
            except Exception as error:  # safetensors raises its own types for a damaged header or body
                raise CheckpointError(f"{path} is unreadable ({error}); delete it and the IVF lists are "
                                      "trained again") from None
            if centroids.ndim != 2 or centroids.shape[1] != self.store.dim:
                raise CheckpointError(f"{path} holds centroids of shape {tuple(centroids.shape)}, not (lists, "
                                      f"{self.store.dim}); delete it and the IVF lists are trained again")
            if wanted is None or default_lists(len(vectors), wanted) == len(centroids):
                return centroids
        options = {k: self.index_options[k] for k in ("seed", "iterations") if k in self.index_options}
        centroids = train_centroids(vectors, wanted, **options)
        temporary = path.with_name(f".{path.name}.tmp")
        try:  # a cache: a read-only index still answers, it just trains again next time
            save_file({"centroids": centroids.contiguous()}, temporary)
            os.replace(temporary, path)
        except OSError as error:
            warnings.warn(f"could not save the IVF lists to {path} ({error}); they will be trained again")
        return centroids

