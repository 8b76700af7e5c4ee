"""Tokenizer: the tokenizer.json pipeline, step by step as the ``tokenizers`` library runs it.

    text ─► added tokens cut out (raw text) ─► normalizer ─► added tokens cut out (normalised text)
         ─► pre-tokenizer (pieces) ─► model (BPE | Unigram | WordPiece: piece -> ids) ─► post-processor
    ids  ─► tokens ─► decoder ─► text

Each step is built from its tokenizer.json object by its own module (normalizers, pre_tokenizers,
bpe_model / unigram / wordpiece, post_processors, decoders); ``hf_json`` reads and writes the file.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import regex

from lmstack.errors import TokenizerError
from lmstack.fileio import write_json
from lmstack.tokenizers.post_processors import PostProcessor
from lmstack.tokenizers.pre_tokenizers import PreTokenizer
from lmstack.tokenizers.pretokenize import from_byte_chars
from lmstack.tokenizers.text import WHITESPACE, is_word_char


class Model(Protocol):
    """What the pipeline needs from a tokenization model."""

    vocab: dict[str, int]

    def tokenize(self, piece: str) -> list[int]: ...


@dataclass
class AddedToken:
    """A token matched whole in the text before the model sees it (e.g. "<|endoftext|>").

    lstrip / rstrip: the match swallows whitespace on its left / right. single_word: matched only when
    not inside a word. normalized: matched in the normalised text rather than the raw text.
    """

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


class Tokenizer:
    """A tokenizer.json pipeline (see the module docstring).

    Args:
        model: BPE, Unigram or WordPiece model (``.vocab`` and ``.tokenize(piece)``).
        normalizer: text -> text, or None.
        pre_tokenizer: splits text into pieces.
        post_processor: special tokens around a sequence or a pair.
        decoder: token strings -> text.
        added_tokens: tokens matched whole before the model.
        hf_json: the tokenizer.json this pipeline was built from (written back by ``save``).
    """

    def __init__(self, model: Model, *, normalizer: Callable[[str], str] | None, pre_tokenizer: PreTokenizer,
                 post_processor: PostProcessor, decoder: Callable[[list[str]], str],
                 added_tokens: list[AddedToken], hf_json: dict) -> None:
        self.model, self.normalizer, self.pre_tokenizer = model, normalizer, pre_tokenizer
        self.post_processor, self.decoder, self.hf_json = post_processor, decoder, hf_json
        self.added_tokens = added_tokens
        self.id_to_token = {i: t for t, i in model.vocab.items()}
        for token in added_tokens:  # a normalized token reads back as normalized, as in tokenizers
            normalize = normalizer if token.normalized and normalizer is not None else None
            self.id_to_token[token.id] = normalize(token.content) if normalize else token.content
        self._added = {t.content: t for t in added_tokens}
        # Skipped by the text they read back as, like tokenizers: a normalized special token that
        # normalizes to other text ("<B>" -> "<b>") is not skipped.
        specials = {t.content for t in added_tokens if t.special}
        self._special_ids = {t.id for t in added_tokens if t.special and self.id_to_token[t.id] in specials}
        self._raw, self._raw_by_text = _matcher({t.content: t for t in added_tokens if not t.normalized})
        # A normalized token is looked for as the normalizer rewrites it ("<B>" as "<b>" under Lowercase).
        self._normalized, self._normalized_by_text = _matcher(
            {(normalizer(t.content) if normalizer else t.content): t for t in added_tokens if t.normalized})

    # --- encoding ---------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; the post-processor's special tokens (BOS, ...) if ``add_special_tokens``."""
        ids = self.encode_plain(text)
        return self.post_processor.apply(ids)[0] if add_special_tokens else ids

    def encode_pair(self, text: str, pair: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of a sequence pair, with the post-processor's pair template."""
        a, b = self.encode_plain(text), self.encode_plain(pair)
        if not add_special_tokens:
            return a + b, [0] * len(a) + [1] * len(b)
        return self.post_processor.apply(a, b)

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(text, add_special_tokens) for text in texts]

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` without post-processing."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for section, start, added in _split_added(text, self._raw, self._raw_by_text):
            if added is not None:
                ids.append(added)
                continue
            normalized = self.normalizer(section) if self.normalizer is not None else section
            for part, part_start, added in _split_added(normalized, self._normalized, self._normalized_by_text):
                if added is not None:
                    ids.append(added)
                    continue
                if not part:
                    continue  # an empty stretch yields no piece (no prefix space, no "▁")
                for piece, _ in self.pre_tokenizer.split([(part, 0)], start == 0 and part_start == 0):
                    ids.extend(self.model.tokenize(piece))
        return ids

    # --- decoding ---------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` through the decoder; invalid UTF-8 byte sequences become U+FFFD."""
        tokens = []
        for i in ids:
            i = int(i)
            token = self.id_to_token.get(i)
            if token is None:
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if not (skip_special_tokens and i in self._special_ids):
                tokens.append(token)
        return self.decoder(tokens)

    # --- vocabulary -------------------------------------------------------------------------------------

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id, the model's vocabulary and the added tokens."""
        return {**self.model.vocab, **{t.content: t.id for t in self.added_tokens}}

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The BPE merges (empty for other models)."""
        return list(getattr(self.model, "merges", []))

    @property
    def vocab_size(self) -> int:
        return max(self.id_to_token) + 1 if self.id_to_token else 0

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids)

    def token_to_id(self, token: str) -> int | None:
        added = self._added.get(token)
        return added.id if added is not None else self.model.vocab.get(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each id stands for (vocab_size entries): special tokens and unused ids
        count 0. Used for bits per byte, a measure comparable across tokenizers."""
        lengths = [0] * self.vocab_size
        for i, token in self.id_to_token.items():
            if i in self._special_ids:
                continue
            if token in self._added:
                lengths[i] = len(token.encode("utf-8"))
            elif self.pre_tokenizer.byte_level:
                lengths[i] = len(from_byte_chars(token))
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                lengths[i] = 1
            else:
                lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return lengths

    def save(self, directory) -> Path:
        """Write ``directory/tokenizer.json`` (atomically), the file this pipeline was built from."""
        path = Path(directory) / "tokenizer.json"
        write_json(path, self.hf_json)
        return path


# --- added tokens ---------------------------------------------------------------------------------------

def _matcher(by_text: dict[str, AddedToken]) -> tuple[regex.Pattern | None, dict[str, AddedToken]]:
    """Leftmost-longest matching of the given texts (longest alternative first), and text -> token."""
    by_text = {text: token for text, token in by_text.items() if text}
    contents = sorted(by_text, key=len, reverse=True)
    return (regex.compile("|".join(regex.escape(c) for c in contents)) if contents else None), by_text


def _split_added(text: str, matcher: regex.Pattern | None,
                 added: dict[str, AddedToken]) -> Iterator[tuple[str, int, int | None]]:
    """(stretch, its start offset, None) and (token content, start, token id) in order, as
    ``tokenizers``' AddedVocabulary splits: single_word matches inside a word are skipped; lstrip / rstrip
    matches swallow the whitespace beside them."""
    if matcher is None:
        yield text, 0, None
        return
    last = 0
    for match in matcher.finditer(text):
        start, stop = match.span()
        if start < last:  # inside whitespace an earlier rstrip match swallowed
            continue
        token = added[match.group()]
        if token.single_word and ((start > 0 and is_word_char(text[start - 1])) or
                                  (stop < len(text) and is_word_char(text[stop]))):
            continue
        if token.lstrip:
            while start > last and text[start - 1] in WHITESPACE:
                start -= 1
        if token.rstrip:
            while stop < len(text) and text[stop] in WHITESPACE:
                stop += 1
        if start > last:
            yield text[last:start], last, None
        yield text[start:stop], start, token.id
        last = stop
    if last < len(text) or last == 0:
        yield text[last:], last, None
