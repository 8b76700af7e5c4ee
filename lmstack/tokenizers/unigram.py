"""The Unigram model (Kudo 2018; SentencePiece's, used by T5, ALBERT, XLNet): Viterbi segmentation.

Each vocabulary piece has a log-probability score; a piece of text is split into the sequence of
vocabulary pieces with the highest total score (dynamic programming over end positions, as
SentencePiece's optimised encoder and ``tokenizers`` do). A character no piece covers costs
``min_score - 10`` as the unknown token; consecutive unknown characters fuse into one unknown piece,
which ``byte_fallback`` turns into ``<0xXX>`` byte tokens when all of them exist.
"""

from lmstack.errors import TokenizerError

UNK_PENALTY = 10.0
_CACHE_LIMIT = 200_000


class Unigram:
    """Args:
        pieces: (piece, score) in id order.
        unk_id: id of the unknown token (None: text that no piece covers is an error).
        byte_fallback: unknown pieces become byte tokens when the vocabulary has them all.
    """

    def __init__(self, pieces: list[tuple[str, float]], unk_id: int | None, byte_fallback: bool = False) -> None:
        if not pieces:
            raise TokenizerError("a Unigram model needs at least one piece")
        if unk_id is not None and not 0 <= unk_id < len(pieces):
            raise TokenizerError(f"model.unk_id {unk_id} is outside the vocabulary (size {len(pieces)})")
        self.pieces, self.unk_id, self.byte_fallback = pieces, unk_id, byte_fallback
        self.vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        self.scores = [float(score) for _, score in pieces]
        self.min_score = min(self.scores)
        self.max_length = max(len(piece) for piece, _ in pieces)
        self._cache: dict[str, list[int]] = {}

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one pre-tokenized piece."""
        ids = self._cache.get(text)
        if ids is None:
            ids = [i for piece in self.segment(text) for i in self._piece_ids(piece)]
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[text] = ids
        return ids

    def segment(self, text: str) -> list[str]:
        """The best-scoring split of ``text`` into pieces (unknown runs fused)."""
        n, vocab, scores = len(text), self.vocab, self.scores
        best = [0.0] + [None] * n  # best[e]: score of the best path ending at e
        back: list[tuple[int, int] | None] = [None] * (n + 1)  # (start, id) of the last piece of that path
        unk_score = self.min_score - UNK_PENALTY
        for start in range(n):
            base = best[start]
            if base is None:
                continue
            has_single = False
            for end in range(start + 1, min(n, start + self.max_length) + 1):
                token = vocab.get(text[start:end])
                if token is None:
                    continue
                has_single |= end == start + 1
                candidate = base + scores[token]
                if best[end] is None or candidate > best[end]:
                    best[end], back[end] = candidate, (start, token)
            if not has_single:
                if self.unk_id is None:
                    raise TokenizerError(f"character {text[start]!r} is not in the Unigram vocabulary and the "
                                         "model has no unk_id")
                candidate = base + unk_score
                if best[start + 1] is None or candidate > best[start + 1]:
                    best[start + 1], back[start + 1] = candidate, (start, self.unk_id)
        pieces, end, unknown = [], n, []
        while end > 0:
            start, token = back[end]
            if token == self.unk_id:
                unknown.append(text[start:end])
            else:
                if unknown:
                    pieces.append("".join(reversed(unknown)))
                    unknown = []
                pieces.append(text[start:end])
            end = start
        if unknown:
            pieces.append("".join(reversed(unknown)))
        return pieces[::-1]

    def _piece_ids(self, piece: str) -> list[int]:
        token = self.vocab.get(piece)
        if token is not None:
            return [token]
        if self.byte_fallback:
            bytes_ = [self.vocab.get(f"<0x{b:02X}>") for b in piece.encode("utf-8")]
            if None not in bytes_:
                return bytes_
        return [self.unk_id]
