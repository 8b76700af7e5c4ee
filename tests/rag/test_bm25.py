"""BM25 equals rank-bm25's BM25Okapi on the same tokenisation (including its negative-idf floor)."""

import numpy as np
import pytest

from lmstack.rag.bm25 import BM25, ENGLISH_STOPWORDS, tokenize

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "the cat chased the dog", "a bird sang",
         "the the the cat", "quantum chromodynamics and the strong force", "Cats and dogs: the best of friends!",
         "mixture of experts routes tokens", "low rank adapters train fast", "the end"]
QUERIES = ["the cat", "dog on a log", "experts", "nothing matches here", "the the", "Cats, dogs and birds"]


@pytest.mark.parametrize("stopwords", [ENGLISH_STOPWORDS, ()], ids=["stop-words-dropped", "every-word"])
@pytest.mark.parametrize("k1, b, epsilon", [(1.5, 0.75, 0.25), (1.2, 0.5, 0.1), (2.0, 1.0, 0.5)])
def test_scores_equal_rank_bm25(k1, b, epsilon, stopwords):
    rank_bm25 = pytest.importorskip("rank_bm25")
    corpus = [tokenize(t, stopwords) for t in TEXTS]
    reference = rank_bm25.BM25Okapi(corpus, k1=k1, b=b, epsilon=epsilon)
    ours = BM25(corpus, k1=k1, b=b, epsilon=epsilon)
    for query in QUERIES:
        np.testing.assert_allclose(ours.scores(tokenize(query, stopwords)),
                                   reference.get_scores(tokenize(query, stopwords)), rtol=0, atol=1e-12)


def test_the_idf_floor_keeps_common_words_positive():
    corpus = [tokenize(t, stopwords=()) for t in ["the a", "the b", "the c", "the d", "e"]]
    bm25 = BM25(corpus)
    assert bm25.idf["the"] > 0  # ln((5-4+0.5)/(4+0.5)) < 0 is replaced by 0.25 x the mean idf
    assert bm25.scores(["the"])[4] == 0 and bm25.scores(["the"])[0] > 0


def test_tokenize_is_unicode_words_lowercased():
    assert tokenize("Héllo, WORLD_1 — 東京!") == ["héllo", "world_1", "東京"]


def test_tokenize_drops_english_stop_words_unless_told_not_to():
    assert tokenize("What is the capital of Peru? I don't know.") == ["capital", "peru", "know"]
    assert tokenize("To be, or not to be", stopwords=()) == ["to", "be", "or", "not", "to", "be"]
    assert tokenize("to be or not to be") == []
