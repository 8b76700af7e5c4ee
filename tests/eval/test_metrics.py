"""Metrics against their references: entity F1 against seqeval, macro P/R/F1 against scikit-learn."""

import random

import pytest

from lmstack.eval import accuracy, entity_f1, entity_spans, macro_precision_recall_f1

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-ORG"]


def test_entity_spans_exact_boundaries():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 5)}
    assert entity_f1([["B-PER", "O"]], [["B-PER", "I-PER"]])["entity_f1"] == 0.0  # wrong end: no credit


def test_entity_f1_matches_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = random.Random(0)
    for _ in range(200):
        ref = [[rng.choice(TAGS) for _ in range(rng.randint(1, 9))] for _ in range(4)]
        pred = [[t if rng.random() < 0.6 else rng.choice(TAGS) for t in row] for row in ref]
        ours = entity_f1(pred, ref)
        assert ours["entity_f1"] == pytest.approx(seqeval.f1_score(ref, pred), abs=1e-12)
        assert ours["entity_precision"] == pytest.approx(seqeval.precision_score(ref, pred), abs=1e-12)
        assert ours["entity_recall"] == pytest.approx(seqeval.recall_score(ref, pred), abs=1e-12)


def test_macro_scores_match_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    for _ in range(100):
        y = [rng.randrange(4) for _ in range(30)]
        p = [rng.randrange(4) for _ in range(30)]
        P, R, F, _ = sklearn.precision_recall_fscore_support(y, p, labels=range(4), average="macro", zero_division=0)
        ours = macro_precision_recall_f1(p, y, 4)
        assert (ours["macro_precision"], ours["macro_recall"], ours["macro_f1"]) == pytest.approx((P, R, F), abs=1e-12)
        assert accuracy(p, y) == pytest.approx(sklearn.accuracy_score(y, p))
