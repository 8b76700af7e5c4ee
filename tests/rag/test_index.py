"""Vector indexes: exact top-k equals faiss's IndexFlatIP; IVF finds the exact neighbours on clustered data;
filters never leak a masked row; hybrid fusion by relative scores and by reciprocal ranks."""

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.rag.index import ExactIndex, FaissIndex, IVFIndex, build_index, kmeans
from lmstack.rag.retrieve import reciprocal_rank_fusion, relative_score_fusion


def clustered(n, dim=32, clusters=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g)
    x = centers[torch.randint(clusters, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def test_exact_equals_faiss_flat():
    pytest.importorskip("faiss")
    x, q = clustered(500), clustered(7, seed=1)
    scores, rows = ExactIndex(x).search(q, 10)
    ref_scores, ref_rows = FaissIndex(x, "flat").search(q, 10)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
    numpy_top = (q @ x.T).topk(10).indices
    assert torch.equal(rows, numpy_top)


def test_results_past_the_end_are_marked():
    scores, rows = ExactIndex(clustered(3)).search(clustered(2, seed=1), 5)
    assert rows[:, 3:].eq(-1).all() and scores[:, 3:].eq(float("-inf")).all() and rows[:, :3].ge(0).all()
    scores, rows = ExactIndex(torch.empty(0, 32)).search(clustered(1), 2)
    assert rows.eq(-1).all()


@pytest.mark.parametrize("make", [ExactIndex, lambda x: IVFIndex(x, n_lists=16, n_probe=4),
                                  lambda x: FaissIndex(x, "flat"), lambda x: FaissIndex(x, "hnsw")])
def test_filters_never_return_masked_rows(make):
    try:
        index = make(clustered(400))
    except ConfigError as error:  # faiss not installed
        pytest.skip(str(error))
    allowed = torch.arange(400) % 3 == 0
    scores, rows = index.search(clustered(5, seed=2), 8, allowed)
    found = rows[rows >= 0]
    assert len(found) > 0 and allowed[found].all()


def test_ivf_recall_against_exact():
    x, q = clustered(4000, dim=48, clusters=40), clustered(50, dim=48, clusters=40, seed=0)[:50]
    q = torch.nn.functional.normalize(q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(3)), dim=1)
    exact = ExactIndex(x).search(q, 10)[1]
    few, many = IVFIndex(x, n_lists=64, n_probe=1), IVFIndex(x, n_lists=64, n_probe=16)

    def recall(index):
        got = index.search(q, 10)[1]
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, exact)) / exact.numel()

    assert recall(many) >= 0.95 and recall(many) >= recall(few)
    assert IVFIndex(x, n_lists=64, n_probe=64).search(q, 10)[1].sort(1).values.equal(exact.sort(1).values)


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    x = torch.nn.functional.normalize(centers.repeat_interleave(50, 0) + 0.01 * torch.randn(200, 16, generator=g), dim=1)
    found = kmeans(x, 4, seed=1)
    assert (found @ centers.T).max(0).values.min() > 0.99


def test_build_index_names_kinds():
    assert isinstance(build_index(clustered(10), "exact"), ExactIndex)
    with pytest.raises(ConfigError, match="unknown index"):
        build_index(clustered(10), "annoy")


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=60)
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


def test_relative_score_fusion():
    dense = ([1, 2, 3], [0.9, 0.5, 0.1])  # min-max: 1, 0.5, 0
    lexical = ([2, 4], [3.0, 1.5])  # divided by the best (floor 0): 1, 0.5
    fused = dict(relative_score_fusion([dense, lexical], [0.75, 0.25], floors=[None, 0.0]))
    assert fused == pytest.approx({1: 0.75, 2: 0.75 * 0.5 + 0.25, 3: 0.0, 4: 0.125})
    # without a floor the last lexical match would count as none
    assert dict(relative_score_fusion([dense, lexical], [0.75, 0.25]))[4] == 0.0
    assert relative_score_fusion([([7], [2.0]), ([], [])], [0.5, 0.5]) == [(7, 0.5)]
