"""The BPE model of the tokenizer.json pipeline: one pre-tokenized piece -> token ids (Sennrich et al. 2016).

The piece starts as one symbol per character (with ``continuing_subword_prefix`` on all but the first and
``end_of_word_suffix`` on the last; a character the vocabulary lacks becomes its ``<0xXX>`` byte tokens with
``byte_fallback``, else the unknown token, else it is dropped, exactly as ``tokenizers`` does). Merges are
then applied lowest rank first, leftmost first, from a priority queue over a linked list of symbols, so a
piece of n characters costs O(n log n) rather than the O(n^2) of rescanning every pair after every merge.
``merge_by_rescanning`` is that simple quadratic loop, kept as the readable reference (tested equal).
"""

import heapq

from lmstack.errors import TokenizerError

_CACHE_LIMIT = 200_000
NATIVE_FROM = 64  # pieces of at least this many characters go to the compiled code (when it can be built)


class BPE:
    """Byte-pair encoding over a vocabulary and ranked merges.

    Args:
        vocab: token -> id.
        merges: (left, right) pairs, highest priority first; ``left + right`` (less the right side's
            continuing-subword prefix) must be in ``vocab``.
        unk_token: stands for characters the vocabulary lacks (None: they are dropped).
        continuing_subword_prefix, end_of_word_suffix: markers some BPE vocabularies use ("##", "</w>").
        fuse_unk: consecutive unknown characters become one unknown token.
        byte_fallback: unknown characters become their UTF-8 bytes as ``<0xXX>`` tokens (Llama 2, Mistral).
        ignore_merges: a piece that is itself a token is taken whole (Llama 3).
        native: merge long pieces with the compiled merge (``native_bpe``; same ids), built on first need.
    Raises:
        TokenizerError: a merge or the unknown token names something not in the vocabulary.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, unk_token: str | None = None,
                 continuing_subword_prefix: str | None = None, end_of_word_suffix: str | None = None,
                 fuse_unk: bool = False, byte_fallback: bool = False, ignore_merges: bool = False,
                 native: bool = True) -> None:
        self.vocab, self.merges = vocab, merges
        self.unk_token, self.fuse_unk, self.byte_fallback = unk_token, fuse_unk, byte_fallback
        self.prefix, self.suffix = continuing_subword_prefix or "", end_of_word_suffix or ""
        self.ignore_merges = ignore_merges
        if unk_token is not None and unk_token not in vocab:
            raise TokenizerError(f"model.unk_token {unk_token!r} is not in the vocabulary")
        self.table: dict[tuple[int, int], tuple[int, int]] = {}  # (left id, right id) -> (rank, merged id)
        cut = len(self.prefix)
        for rank, (left, right) in enumerate(merges):
            merged = left + right[cut:] if cut and right.startswith(self.prefix) else left + right
            for token in (left, right, merged):
                if token not in vocab:
                    raise TokenizerError(f"merge {rank} ({left!r} {right!r}) names {token!r}, which is not in the "
                                         "vocabulary")
            self.table[vocab[left], vocab[right]] = (rank, vocab[merged])
        self._cache: dict[str, list[int]] = {}
        self.native, self._native, self._native_encodes = native, None, False

    def tokenize(self, piece: str) -> list[int]:
        """Token ids of one pre-tokenized piece."""
        ids = self._cache.get(piece)
        if ids is None:
            if self.ignore_merges and piece in self.vocab:
                ids = [self.vocab[piece]]
            elif self.native and len(piece) >= NATIVE_FROM and self._native_ready():
                ids = self._native.encode(piece) if self._native_encodes else \
                    self._native.merge(self.initial_symbols(piece))
            else:
                ids = self.merge(self.initial_symbols(piece))
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[piece] = ids
        return ids

    def initial_symbols(self, piece: str) -> list[int]:
        """One id per character before any merge (see the module docstring for unknown characters)."""
        vocab, ids, unk_run = self.vocab, [], False
        last = len(piece) - 1
        for i, char in enumerate(piece):
            symbol = (self.prefix + char if i and self.prefix else char) + (self.suffix if i == last else "")
            token = vocab.get(symbol)
            if token is not None:
                ids.append(token)
                unk_run = False
                continue
            if self.byte_fallback:
                bytes_ = [vocab.get(f"<0x{b:02X}>") for b in symbol.encode("utf-8")]
                if None not in bytes_:
                    ids.extend(bytes_)
                    unk_run = False
                    continue
            if self.unk_token is not None:
                if not (self.fuse_unk and unk_run):
                    ids.append(vocab[self.unk_token])
                unk_run = True
        return ids

    def _native_ready(self) -> bool:
        """Build the compiled merger on first need (False, not None, once it proved unavailable)."""
        if self._native is None:
            from lmstack.tokenizers.native_bpe import native_merger

            self._native = native_merger(self.table) or False
            # Whole pieces in C++ too, where the symbols need no prefix or suffix.
            self._native_encodes = bool(self._native) and not self.prefix and not self.suffix
            if self._native_encodes:
                self._native.set_vocabulary(self.vocab, self.vocab.get(self.unk_token) if self.unk_token else None,
                                            self.fuse_unk, self.byte_fallback)
        return bool(self._native)

    def merge(self, ids: list[int]) -> list[int]:
        """Apply merges to a symbol sequence: lowest rank first, leftmost first (a min-heap of candidates)."""
        n, table = len(ids), self.table
        if n < 2:
            return ids
        heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := table.get((ids[i], ids[i + 1]))) is not None]
        if not heap:
            return ids
        heapq.heapify(heap)
        symbols, alive = list(ids), [True] * n
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        while heap:
            _, pos, merged = heapq.heappop(heap)
            right = nxt[pos]
            if not alive[pos] or right == -1:
                continue
            current = table.get((symbols[pos], symbols[right]))
            if current is None or current[1] != merged:  # stale: a neighbour merged since this was queued
                continue
            symbols[pos], alive[right] = merged, False
            after = nxt[right]
            nxt[pos] = after
            if after != -1:
                prv[after] = pos
                if (m := table.get((merged, symbols[after]))) is not None:
                    heapq.heappush(heap, (m[0], pos, m[1]))
            before = prv[pos]
            if before != -1 and (m := table.get((symbols[before], merged))) is not None:
                heapq.heappush(heap, (m[0], before, m[1]))
        return [s for s, keep in zip(symbols, alive) if keep]


def merge_by_rescanning(table: dict[tuple[int, int], tuple[int, int]], ids: list[int]) -> list[int]:
    """The reference merge loop: find the lowest-ranked adjacent pair, merge its leftmost occurrence, repeat.
    Quadratic in the piece's length; ``BPE.merge`` must give the same ids."""
    ids = list(ids)
    while len(ids) > 1:
        candidates = [(table[pair][0], i) for i, pair in enumerate(zip(ids, ids[1:])) if pair in table]
        if not candidates:
            break
        _, i = min(candidates)
        ids[i:i + 2] = [table[ids[i], ids[i + 1]][1]]
    return ids
