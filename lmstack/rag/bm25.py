"""Okapi BM25: the lexical half of hybrid search.

    bm25 = BM25([tokenize(t) for t in texts])            # k1=1.5, b=0.75, epsilon=0.25
    scores = bm25.scores(tokenize("who wrote hamlet"))    # (N,) float64, one per text

score(q, d) = Σ_{t in q} idf(t) · f(t, d)·(k1 + 1) / (f(t, d) + k1·(1 − b + b·|d| / avgdl)),
idf(t) = ln((N − n_t + 0.5) / (n_t + 0.5)). A term in more than half the texts would get a negative idf;
like rank-bm25 (``BM25Okapi``, whose scores these equal), it gets ``epsilon`` × the mean idf of the
vocabulary instead, so a common word still counts a little and never against a text. A query term repeated
counts once per repetition; terms the corpus lacks add nothing.

``tokenize`` drops English stop words by default (NLTK's list, as Weaviate's and Elasticsearch's English
analysers drop theirs): "what is the capital of peru" scores on "capital" and "peru" instead of on five words
every text shares. On the chatterbot questions of benchmarks/rag.py this lifts BM25 recall@5 from 0.260 to
0.284. Pass ``stopwords=()`` to keep every word (a query made only of stop words then still matches).
"""

import math
from collections import Counter

import numpy as np
import regex

_TOKEN = regex.compile(r"\w+")

# NLTK's English stop words (nltk.corpus.stopwords.words("english")) less its apostrophe forms: \w+ splits
# "don't" into "don" and "t", which are both here.
ENGLISH_STOPWORDS = frozenset("""
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
    hers herself it its itself they them their theirs themselves what which who whom this that these
    those am is are was were be been being have has had having do does did doing a an the and but if or
    because as until while of at by for with about against between into through during before after
    above below to from up down in out on off over under again further then once here there when where
    why how all any both each few more most other some such no nor not only own same so than too very s
    t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn hasn haven isn ma
    mightn mustn needn shan shouldn wasn weren won wouldn
""".split())


def tokenize(text: str, stopwords: frozenset[str] | set[str] | tuple = ENGLISH_STOPWORDS) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore; any script) less ``stopwords``: BM25's default
    tokenisation. ``stopwords=()`` keeps every word."""
    return [word for word in _TOKEN.findall(text.lower()) if word not in stopwords]


class BM25:
    """BM25 scores over a fixed list of tokenised texts (an inverted index of term frequencies)."""

    def __init__(self, corpus: list[list[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> None:
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.n = len(corpus)
        self.lengths = np.array([len(doc) for doc in corpus], dtype=np.float64)
        self.avgdl = float(self.lengths.sum() / self.n) if self.n and self.lengths.sum() else 1.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for row, doc in enumerate(corpus):
            for term, count in Counter(doc).items():
                rows, counts = postings.setdefault(term, ([], []))
                rows.append(row)
                counts.append(count)
        self.postings = {t: (np.array(r, dtype=np.int64), np.array(c, dtype=np.float64))
                         for t, (r, c) in postings.items()}
        self.idf = self._idf()
        self._norm = k1 * (1 - b + b * self.lengths / self.avgdl)  # the length part of every denominator

    def _idf(self) -> dict[str, float]:
        idf = {t: math.log(self.n - len(rows) + 0.5) - math.log(len(rows) + 0.5)
               for t, (rows, _) in self.postings.items()}
        floor = self.epsilon * (sum(idf.values()) / len(idf)) if idf else 0.0
        return {t: (floor if value < 0 else value) for t, value in idf.items()}

    def scores(self, query: list[str]) -> np.ndarray:
        """(N,) the BM25 score of every text for the tokenised ``query``."""
        out = np.zeros(self.n, dtype=np.float64)
        for term in query:
            if term not in self.postings:
                continue
            rows, counts = self.postings[term]
            out[rows] += self.idf[term] * (counts * (self.k1 + 1) / (counts + self._norm[rows]))
        return out
