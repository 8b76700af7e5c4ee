"""Byte-level BPE training (Sennrich et al. 2016; GPT-2's byte-level variant).

``train_bpe`` learns merges from text and returns a ``Tokenizer`` pipeline (ByteLevel pre-tokenizer, BPE
model, ByteLevel decoder) that encodes any UTF-8 text and round-trips it exactly; encoding itself lives
in ``bpe_model`` and ``pipeline``.
"""

import heapq
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import regex

from lmstack.errors import TokenizerError
from lmstack.tokenizers.hf_json import byte_level_bpe_json, tokenizer_from_json
from lmstack.tokenizers.pipeline import Tokenizer
from lmstack.tokenizers.pretokenize import GPT2_PATTERN, bytes_to_unicode, compile_pattern, to_byte_chars


# --- training ---------------------------------------------------------------------------------------------

def train_bpe(texts: Iterable["str | os.PathLike"], vocab_size: int, special_tokens: Iterable[str] = (),
              pattern: str = GPT2_PATTERN, progress=None) -> Tokenizer:
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
    # Special tokens stay in the model's vocabulary too, as tokenizer.json files have them.
    return tokenizer_from_json(byte_level_bpe_json(vocab, merges, pattern, special_tokens), source="train_bpe")


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
