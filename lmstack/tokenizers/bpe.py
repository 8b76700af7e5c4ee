"""Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant): encode, decode and train.

Encoding: special (added) tokens are cut out whole first; each remaining stretch is normalised, split
into words by a regex, turned into byte-level characters, and merged pair by pair in merge-rank order
(the lowest-ranked adjacent pair first, all its occurrences left to right). Any UTF-8 text round-trips.
Training: see ``train_bpe``.
"""

import heapq
import os
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import regex

from lmstack.tokenizers.pretokenize import (GPT2_PATTERN, bytes_to_unicode, compile_pattern, from_byte_chars,
                                             split_isolated, to_byte_chars)

NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}


class TokenizerError(ValueError):
    """A tokenizer file or argument is invalid; the message names it."""


@dataclass
class AddedToken:
    """A token matched whole in the raw text before any splitting (e.g. "<|endoftext|>")."""

    content: str
    id: int
    special: bool = True


@dataclass
class BPETokenizer:
    """A byte-level BPE tokenizer.

    Attributes:
        vocab: token string (byte-level characters) -> id.
        merges: merge rules, highest priority first.
        pattern: the word-splitting regex.
        added_tokens: tokens matched whole before splitting.
        normalizers: unicode normalisations applied to text outside added tokens ("NFC", "Lowercase", ...).
        add_prefix_space: prepend a space to each stretch that does not start with one (GPT-2 option).
        ignore_merges: a word that is itself a vocabulary entry is taken whole (Llama 3).
        prefix_tokens, suffix_tokens: ids added around a sequence when ``add_special_tokens`` (e.g. BOS).
        hf_json: the tokenizer.json this was read from, kept so saving preserves unknown fields.
    """

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    pattern: str = GPT2_PATTERN
    added_tokens: list[AddedToken] = field(default_factory=list)
    normalizers: tuple[str, ...] = ()
    add_prefix_space: bool = False
    ignore_merges: bool = False
    prefix_tokens: list[int] = field(default_factory=list)
    suffix_tokens: list[int] = field(default_factory=list)
    hf_json: dict | None = None

    def __post_init__(self) -> None:
        for name in self.normalizers:
            if name not in NORMALIZERS:
                raise TokenizerError(f"unsupported normalizer {name!r}; supported: {sorted(NORMALIZERS)}")
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        for token in self.added_tokens:
            self.id_to_token[token.id] = token.content
        self._added = {t.content: t.id for t in self.added_tokens}
        self._special_ids = {t.id for t in self.added_tokens if t.special}
        self._added_re = (regex.compile("|".join(regex.escape(t) for t in sorted(self._added, key=len, reverse=True)))
                          if self._added else None)
        self._cache: dict[str, list[int]] = {}
        compile_pattern(self.pattern)

    # --- encoding ---------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS/EOS from the post-processor only if ``add_special_tokens``."""
        ids: list[int] = []
        for chunk, added_id in self._split_added(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for piece in split_isolated(self._normalize(chunk), self.pattern):
                ids.extend(self._word_ids(to_byte_chars(piece)))
        return self.prefix_tokens + ids + self.suffix_tokens if add_special_tokens else ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(text, add_special_tokens) for text in texts]

    def _split_added(self, text: str) -> Iterator[tuple[str, int | None]]:
        """Stretches of plain text, and added tokens (with their id), in order."""
        if self._added_re is None:
            yield text, None
            return
        last = 0
        for match in self._added_re.finditer(text):
            if match.start() > last:
                yield text[last:match.start()], None
            yield match.group(), self._added[match.group()]
            last = match.end()
        if last < len(text):
            yield text[last:], None

    def _normalize(self, text: str) -> str:
        for name in self.normalizers:
            text = text.lower() if name == "Lowercase" else unicodedata.normalize(name, text)
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        return text

    def _word_ids(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if self.ignore_merges and word in self.vocab:
            ids = [self.vocab[word]]
        else:
            try:
                ids = [self.vocab[symbol] for symbol in self._merge(word)]
            except KeyError as error:
                raise TokenizerError(f"symbol {error.args[0]!r} is not in the vocabulary") from None
        if len(self._cache) < 200_000:
            self._cache[word] = ids
        return ids

    def _merge(self, word: str) -> list[str]:
        """Apply merges: repeatedly join every occurrence of the lowest-ranked adjacent pair."""
        symbols = list(word)
        ranks = self.ranks
        while len(symbols) > 1:
            best_rank, best = min(((ranks.get(pair, 1 << 60), pair) for pair in zip(symbols, symbols[1:])))
            if best_rank == 1 << 60:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    # --- decoding ---------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self._special_ids:
                continue
            token = self.id_to_token.get(i)
            if token is None:
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            out += token.encode("utf-8") if token in self._added else from_byte_chars(token)
        return out.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return max(self.id_to_token) + 1 if self.id_to_token else 0

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each id stands for (vocab_size entries): special tokens and unused ids
        count 0. Used for bits per byte, a measure comparable across tokenizers."""
        lengths = [0] * self.vocab_size
        for i, token in self.id_to_token.items():
            if i in self._special_ids:
                continue
            lengths[i] = len(token.encode("utf-8")) if token in self._added else len(from_byte_chars(token))
        return lengths

    def token_to_id(self, token: str) -> int | None:
        return self._added.get(token, self.vocab.get(token))

    def save(self, directory) -> "Path":
        """Write ``directory/tokenizer.json`` (atomically); returns the path."""
        from lmstack.tokenizers.hf_json import save_tokenizer_json  # hf_json imports this module

        return save_tokenizer_json(self, directory)


# --- training ---------------------------------------------------------------------------------------------

def train_bpe(texts: Iterable["str | os.PathLike"], vocab_size: int, special_tokens: Iterable[str] = (),
              pattern: str = GPT2_PATTERN, progress=None) -> BPETokenizer:
    """Train a byte-level BPE tokenizer.

    Counts each distinct word once, starts from the 256 byte symbols, and repeatedly merges the most
    frequent adjacent pair. Pair counts are updated incrementally (only words containing the merged
    pair are revisited) and the best pair comes from a max-heap with lazy invalidation, so a merge costs
    work proportional to the words it touches, not to the corpus.

    Args:
        texts: training documents: strings, or paths of UTF-8 text files (pathlib.Path / os.PathLike).
        vocab_size: final vocabulary size, special tokens and the 256 bytes included.
        special_tokens: tokens given the first ids and never split.
        pattern: word-splitting regex (default GPT-2's).
        progress: optional callable ``progress(merges_done, merges_wanted)``.
    Raises:
        TokenizerError: vocab_size too small, an unreadable file, or an empty corpus.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    alphabet = sorted(bytes_to_unicode().values())
    if vocab_size < len(alphabet) + len(special_tokens):
        raise TokenizerError(f"vocab_size={vocab_size} is smaller than the 256 byte symbols plus "
                             f"{len(special_tokens)} special tokens")
    words = _count_words(map(_read_if_path, texts), pattern, special_tokens)
    if not words:
        raise TokenizerError("empty corpus: no text to train on")
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for char in alphabet:
        vocab[char] = len(vocab)
    merges = _learn_merges(words, vocab, vocab_size, progress)
    added = [AddedToken(t, vocab[t]) for t in special_tokens]  # they stay in vocab, as tokenizer.json has them
    return BPETokenizer(vocab=vocab, merges=merges, pattern=pattern, added_tokens=added)


def _read_if_path(item: "str | os.PathLike") -> str:
    if isinstance(item, str):
        return item
    try:
        return Path(item).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"cannot read training file {item}: {error}") from None


def _count_words(texts: Iterable[str], pattern: str, special_tokens: list[str]) -> Counter:
    splitter = regex.compile("|".join(regex.escape(t) for t in special_tokens)) if special_tokens else None
    compiled = compile_pattern(pattern)
    counts: Counter = Counter()
    for text in texts:
        for part in (splitter.split(text) if splitter else [text]):
            counts.update(compiled.findall(part))
    return Counter({to_byte_chars(word): n for word, n in counts.items() if word})


def _learn_merges(words: Counter, vocab: dict[str, int], vocab_size: int, progress) -> list[tuple[str, str]]:
    corpus = [list(word) for word in words]  # each distinct word as a list of symbols
    freqs = list(words.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> words containing it
    for w, symbols in enumerate(corpus):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[w]
            where[pair].add(w)
    # Max-heap on (count, pair); entries go stale when counts change and are re-checked on pop.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    start = len(vocab)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if -negative != count:  # stale entry: push the current count back
            heapq.heappush(heap, (-count, pair))
            continue
        merges.append(pair)
        # Two merges can spell the same string ("a"+"bc", "ab"+"c"): it keeps its first id.
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        for changed in _apply_merge(pair, corpus, freqs, where, pair_counts):
            heapq.heappush(heap, (-pair_counts[changed], changed))
        if progress is not None:
            progress(len(vocab) - start, vocab_size - start)
    return merges


def _apply_merge(pair: tuple[str, str], corpus: list[list[str]], freqs: list[int],
                 where: dict[tuple[str, str], set[int]], pair_counts: Counter) -> set[tuple[str, str]]:
    """Merge ``pair`` in every word holding it, updating pair counts; returns the pairs whose count rose."""
    first, second = pair
    joined = first + second
    risen: set[tuple[str, str]] = set()
    for w in list(where.pop(pair, ())):
        symbols, freq = corpus[w], freqs[w]
        for old in zip(symbols, symbols[1:]):
            pair_counts[old] -= freq
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                merged.append(joined)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        corpus[w] = merged
        for new in zip(merged, merged[1:]):
            pair_counts[new] += freq
            where[new].add(w)
            if joined in new:
                risen.add(new)
    pair_counts.pop(pair, None)
    return risen
