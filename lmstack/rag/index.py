"""Vector indexes: top-k rows by inner product (cosine similarity, for the unit vectors of a SentenceEncoder).

    index = ExactIndex(vectors)                    # (N, D) float32
    scores, rows = index.search(queries, k=5)      # (Q, 5) each, best first; rows -1 / scores -inf past the end
    IVFIndex(vectors, n_lists=1024, n_probe=16)    # approximate: k-means lists, only n_probe of them scanned
    IVFIndex(vectors, centroids=train_centroids(vectors))   # lists trained once, reused (Index saves them)
    FaissIndex(vectors, "hnsw")                    # the same interface over faiss, when it is installed

Every ``search`` takes ``allowed``, an optional (N,) bool mask (metadata filters, deleted rows): rows where it
is False are never returned. ``ExactIndex`` is the reference the approximate ones are measured against
(recall@k: the fraction of the exact top-k they find).
"""

import math

import torch

from lmstack.errors import ConfigError


def _check(vectors: torch.Tensor) -> torch.Tensor:
    if vectors.ndim != 2:
        raise ConfigError(f"an index takes an (N, D) matrix of vectors, got shape {tuple(vectors.shape)}")
    return vectors.float().contiguous()


def _pad(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend (Q, j) results with j < k to (Q, k): rows -1 and scores -inf stand for "no more results"."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, rows
    q = scores.shape[0]
    return (torch.cat([scores, scores.new_full((q, missing), float("-inf"))], 1),
            torch.cat([rows, rows.new_full((q, missing), -1)], 1))


def top_k(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, N) scores -> the (Q, k) best scores and their column indices (masked columns never returned)."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    best, rows = scores.topk(min(k, scores.shape[1]), dim=1)
    rows = rows.masked_fill(best == float("-inf"), -1)
    return _pad(best, rows, k)


class ExactIndex:
    """Brute force: one matrix product against every vector. Exact, and fast enough to ~10^5 rows."""

    def __init__(self, vectors: torch.Tensor) -> None:
        self.vectors = _check(vectors)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None):
        """queries: (Q, D) -> (scores, rows), each (Q, k)."""
        return top_k(queries.float() @ self.vectors.T, k, allowed)


def kmeans(vectors: torch.Tensor, n: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """(n, D) unit centroids of spherical k-means (assign by inner product, renormalise the means), started
    from ``n`` distinct rows chosen at random; an emptied cluster restarts at a random row."""
    generator = torch.Generator().manual_seed(seed)
    centroids = vectors[torch.randperm(len(vectors), generator=generator)[:n]].clone()
    for _ in range(iterations):
        assign = (vectors @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=n)
        empty = counts == 0
        if empty.any():
            sums[empty] = vectors[torch.randint(len(vectors), (int(empty.sum()),), generator=generator)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def default_lists(n: int, n_lists: int | None = None) -> int:
    """IVF lists for ``n`` vectors: ``n_lists`` if given, else ~4·sqrt(n); at least 1, at most n."""
    return max(1, min(n_lists or round(4 * math.sqrt(n)), n))


def train_centroids(vectors: torch.Tensor, n_lists: int | None = None, seed: int = 0,
                    iterations: int = 10) -> torch.Tensor:
    """(n_lists, D) IVF list centroids: spherical k-means on at most 64 sampled vectors a list."""
    vectors = _check(vectors)
    n, lists = len(vectors), default_lists(len(vectors), n_lists)
    sample = vectors
    if n > 64 * lists:
        sample = vectors[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:64 * lists]]
    return kmeans(sample, lists, iterations, seed)


class IVFIndex:
    """Inverted file: k-means splits the vectors into ``n_lists`` lists; a query scans only the ``n_probe``
    lists whose centroids it is closest to. Vectors are stored sorted by list, so each list is one slice.

    Args:
        vectors: (N, D), ideally unit length (the lists come from spherical k-means).
        n_lists: lists (default ~4·sqrt(N)); k-means trains on at most 64 vectors a list (faiss warns
            below 39).
        n_probe: lists scanned per query: more is slower and closer to exact.
        centroids: (n_lists, D) lists trained before (``train_centroids``; an index reopened, rows added
            since): the vectors are only assigned to them, as faiss's IVF ``add`` does after ``train``.
    """

    def __init__(self, vectors: torch.Tensor, n_lists: int | None = None, n_probe: int = 16, seed: int = 0,
                 iterations: int = 10, centroids: torch.Tensor | None = None) -> None:
        vectors = _check(vectors)
        if len(vectors) == 0:
            raise ConfigError("an IVF index needs at least one vector")
        if n_probe < 1:
            raise ConfigError(f"n_probe={n_probe} must be at least 1")
        self.n_probe = n_probe
        if centroids is None:
            centroids = train_centroids(vectors, n_lists, seed, iterations)
        elif centroids.ndim != 2 or centroids.shape[1] != vectors.shape[1]:
            raise ConfigError(f"IVF centroids of shape {tuple(centroids.shape)} do not fit vectors of "
                              f"width {vectors.shape[1]}")
        self.centroids, self.n_lists = centroids.float(), len(centroids)
        assign = torch.cat([(part @ self.centroids.T).argmax(1) for part in vectors.split(65536)])
        self.order = torch.argsort(assign, stable=True)  # sorted position -> original row
        self.sorted = vectors[self.order]
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                                  torch.bincount(assign, minlength=self.n_lists).cumsum(0)]).tolist()

    def __len__(self) -> int:
        return self.sorted.shape[0]

    def search(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None):
        """queries: (Q, D) -> (scores, rows), each (Q, k), from the n_probe nearest lists of each query."""
        queries = queries.float()
        lists = (queries @ self.centroids.T).topk(min(self.n_probe, self.n_lists), dim=1).indices.tolist()
        results = []
        for query, probed in zip(queries, lists):
            spans = [(self.offsets[i], self.offsets[i + 1]) for i in probed]
            scores = torch.cat([self.sorted[a:b] @ query for a, b in spans])
            positions = torch.cat([torch.arange(a, b) for a, b in spans])
            rows = self.order[positions]
            best, where = top_k(scores[None], k, None if allowed is None else allowed[rows][None])
            results.append((best, torch.where(where >= 0, rows[where.clamp(min=0)], -1)))
        return torch.cat([s for s, _ in results]), torch.cat([r for _, r in results])


class FaissIndex:
    """The same interface over faiss (``pip install faiss-cpu``): "flat" (exact inner product) or "hnsw"
    (graph search; ``m`` links a node, ``ef_search`` candidates a query)."""

    def __init__(self, vectors: torch.Tensor, kind: str = "flat", m: int = 32, ef_search: int = 64) -> None:
        try:
            import faiss
        except ImportError:
            raise ConfigError("the faiss backend needs faiss: pip install faiss-cpu") from None
        if kind not in ("flat", "hnsw"):
            raise ConfigError(f"unknown faiss index {kind!r}; choose flat or hnsw")
        self.faiss, vectors = faiss, _check(vectors)
        dim = vectors.shape[1]
        self.index = (faiss.IndexFlatIP(dim) if kind == "flat"
                      else faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT))
        if kind == "hnsw":
            self.index.hnsw.efSearch = ef_search
        self.index.add(vectors.numpy())

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None):
        params = None
        if allowed is not None:
            selector = self.faiss.IDSelectorBatch(torch.nonzero(allowed).flatten().numpy())
            params = (self.faiss.SearchParametersHNSW(sel=selector) if isinstance(self.index, self.faiss.IndexHNSW)
                      else self.faiss.SearchParameters(sel=selector))
        scores, rows = self.index.search(queries.float().contiguous().numpy(), k, params=params)
        scores, rows = torch.from_numpy(scores), torch.from_numpy(rows)
        return scores.masked_fill(rows < 0, float("-inf")), rows


INDEX_KINDS = ("exact", "ivf", "faiss-flat", "faiss-hnsw")


def build_index(vectors: torch.Tensor, kind: str = "exact", **options):
    """An index of ``kind`` (one of INDEX_KINDS) over ``vectors``; options go to its constructor."""
    if kind == "exact":
        return ExactIndex(vectors)
    if kind == "ivf":
        return IVFIndex(vectors, **options)
    if kind in ("faiss-flat", "faiss-hnsw"):
        return FaissIndex(vectors, kind.removeprefix("faiss-"), **options)
    raise ConfigError(f"unknown index {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
