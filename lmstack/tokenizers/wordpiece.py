"""WordPiece with BERT's basic tokenizer (Devlin et al. 2019), as Hugging Face's BertTokenizerFast does it.

Normalise (drop control characters, whitespace -> " ", pad CJK ideographs with spaces, strip accents,
lower-case) -> split on whitespace and punctuation -> greedy longest-match-first WordPiece with "##"
continuations, a whole word becoming [UNK] when it cannot be covered or is longer than
``max_input_chars_per_word``. Every normalised character remembers the original character it came from,
so token offsets point into the text the caller passed.
"""

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import regex

from lmstack.errors import TokenizerError
from lmstack.fileio import atomic_path, write_json
from lmstack.tokenizers.decoders import cleanup_tokenization as _cleanup
from lmstack.tokenizers.text import is_bert_control as _is_control
from lmstack.tokenizers.text import is_bert_punctuation as _is_punctuation
from lmstack.tokenizers.text import is_bert_whitespace as _is_whitespace
from lmstack.tokenizers.text import is_cjk as _is_cjk

Span = tuple[int, int]


@dataclass
class WordPieceTokenizer:
    """BERT-style WordPiece tokenizer.

    Attributes:
        vocab: token -> id ("##" marks a word continuation).
        lowercase, strip_accents, handle_chinese_chars, clean_text: BERT basic-tokenizer options
            (strip_accents=None follows lowercase).
        unk_token, cls_token, sep_token, pad_token, mask_token: special tokens (must be in vocab).
        max_input_chars_per_word: longer words become [UNK].
    """

    vocab: dict[str, int]
    lowercase: bool = True
    strip_accents: bool | None = None
    handle_chinese_chars: bool = True
    clean_text: bool = True
    unk_token: str = "[UNK]"
    cls_token: str = "[CLS]"
    sep_token: str = "[SEP]"
    pad_token: str = "[PAD]"
    mask_token: str = "[MASK]"
    max_input_chars_per_word: int = 100
    continuing_subword_prefix: str = "##"
    hf_json: dict | None = field(default=None, repr=False)  # the tokenizer.json form (hf_json.wordpiece_json)
    id_to_token: dict[int, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("unk_token", "cls_token", "sep_token", "pad_token"):
            if getattr(self, name) not in self.vocab:
                raise TokenizerError(f"{name} {getattr(self, name)!r} is not in the vocabulary")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self._special = {self.vocab[t] for t in (self.unk_token, self.cls_token, self.sep_token, self.pad_token,
                                                 self.mask_token) if t in self.vocab}
        self._ascii_split = None  # (str.translate table, word regex), built on the first ASCII text
        self._word_ids: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # --- the pipeline -------------------------------------------------------------------------------------

    def normalize(self, text: str) -> list[tuple[str, int]]:
        """Normalised characters, each with the index of the original character it came from."""
        strip = self.lowercase if self.strip_accents is None else self.strip_accents
        out: list[tuple[str, int]] = []
        for i, char in enumerate(text):
            if self.clean_text:
                if char in ("\0", "\ufffd") or _is_control(char):
                    continue
                if _is_whitespace(char):
                    char = " "
            pieces = f" {char} " if self.handle_chinese_chars and _is_cjk(char) else char
            if strip:
                pieces = "".join(c for c in unicodedata.normalize("NFD", pieces) if unicodedata.category(c) != "Mn")
            if self.lowercase:
                pieces = pieces.lower()
            out.extend((c, i) for c in pieces)
        return out

    def tokenize_with_offsets(self, text: str) -> list[tuple[int, Span]]:
        """(token id, (start, end) character offsets into ``text``) for every token, no special tokens."""
        chars = self.normalize(text)
        tokens: list[tuple[int, Span]] = []
        for start, end in _split_words(chars):
            word = "".join(c for c, _ in chars[start:end])
            for (piece_start, piece_end), token_id in self._wordpiece(word):
                tokens.append((token_id, (chars[start + piece_start][1], chars[start + piece_end - 1][1] + 1)))
        return tokens

    def _wordpiece(self, word: str) -> list[tuple[Span, int]]:
        return wordpiece_pieces(word, self.vocab, self.vocab[self.unk_token], self.continuing_subword_prefix,
                                self.max_input_chars_per_word)

    # --- public API ---------------------------------------------------------------------------------------

    def ids(self, text: str) -> list[int]:
        """The token ids of ``text`` (no special tokens): those of ``tokenize_with_offsets``, computed faster.
        ASCII text (most of it) is normalised by one ``str.translate`` and split by one regex instead of
        character by character, and each word's pieces are remembered."""
        if not text.isascii():
            return [i for i, _ in self.tokenize_with_offsets(text)]
        if self._ascii_split is None:
            self._ascii_split = self._ascii_tables()
        table, words = self._ascii_split
        out: list[int] = []
        for word in words.findall(text.translate(table)):
            pieces = self._word_ids.get(word)
            if pieces is None:
                pieces = [token_id for _, token_id in self._wordpiece(word)]
                if len(self._word_ids) < 200_000:
                    self._word_ids[word] = pieces
            out.extend(pieces)
        return out

    def _ascii_tables(self):
        """``normalize`` and ``_split_words`` restricted to ASCII, as a translation table and a regex."""
        table = {}
        for code in range(128):
            char = chr(code)
            normal = self.normalize(char)
            table[code] = "".join(c for c, _ in normal)
        kept = {c for c in table.values() if c}
        spaces = "".join(sorted(c for c in kept if c == " " or _is_whitespace(c)))
        punctuation = "".join(sorted(c for c in kept if c not in spaces and _is_punctuation(c)))
        alone = f"[{regex.escape(punctuation)}]|" if punctuation else ""
        words = regex.compile(f"{alone}[^{regex.escape(spaces + punctuation)}]+")
        return table, words

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; [CLS] ... [SEP] around them if ``add_special_tokens``."""
        ids = self.ids(text)
        return [self.vocab[self.cls_token], *ids, self.vocab[self.sep_token]] if add_special_tokens else ids

    def __call__(self, text: str, text_pair: str | None = None, *, add_special_tokens: bool = True,
                 truncation: bool | str = False, max_length: int | None = None,
                 padding: bool | str = False) -> dict[str, list]:
        """One sequence or pair: input_ids, token_type_ids, attention_mask and offset_mapping.

        truncation: False, True / "longest_first", "only_first" or "only_second" (needs max_length).
        padding: False, "max_length" (to max_length) or True / "longest" (no-op for one sequence).
        """
        first = self.tokenize_with_offsets(text)
        second = self.tokenize_with_offsets(text_pair) if text_pair is not None else None
        if truncation:
            if max_length is None:
                raise TokenizerError("truncation needs max_length")
            n_special = (3 if second is not None else 2) if add_special_tokens else 0
            first, second = _truncate(first, second, max_length - n_special,
                                      "longest_first" if truncation is True else truncation)
        encoded = self._assemble(first, second, add_special_tokens)
        if padding == "max_length":
            if max_length is None:
                raise TokenizerError("padding='max_length' needs max_length")
            encoded = self._pad(encoded, max_length)
        return encoded

    def encode_batch(self, texts: list[str], text_pairs: list[str] | None = None, *, padding: bool | str = False,
                     **options) -> dict[str, list[list]]:
        """Several sequences (or pairs); padding=True / "longest" pads to the longest in the batch."""
        pairs = text_pairs if text_pairs is not None else [None] * len(texts)
        rows = [self(t, p, padding="max_length" if padding == "max_length" else False, **options)
                for t, p in zip(texts, pairs)]
        if padding in (True, "longest"):
            longest = max(len(r["input_ids"]) for r in rows)
            rows = [self._pad(r, longest) for r in rows]
        return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Tokens joined by spaces, "##" pieces glued on, then BERT's punctuation clean-up."""
        words: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self._special:
                continue
            token = self.id_to_token.get(i)
            if token is None:
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if token.startswith(self.continuing_subword_prefix) and words:
                words[-1] += token[len(self.continuing_subword_prefix):]
            else:
                words.append(token)
        return _cleanup(" ".join(words))

    def save(self, directory) -> Path:
        """Write ``directory/vocab.txt`` and ``directory/tokenizer.json`` (atomically); returns the latter."""
        directory = Path(directory)
        ordered = [t for t, _ in sorted(self.vocab.items(), key=lambda item: item[1])]
        with atomic_path(directory / "vocab.txt") as tmp:
            tmp.write_text("\n".join(ordered) + "\n", encoding="utf-8")
        if self.hf_json is None:
            raise TokenizerError("this WordPieceTokenizer was built in memory without its tokenizer.json form; "
                                 "set hf_json = lmstack.tokenizers.hf_json.wordpiece_json(tokenizer) to save it")
        path = directory / "tokenizer.json"
        write_json(path, self.hf_json)
        return path

    # --- helpers --------------------------------------------------------------------------------------------

    def _assemble(self, first, second, add_special_tokens: bool) -> dict[str, list]:
        cls_, sep = self.vocab[self.cls_token], self.vocab[self.sep_token]
        ids, types, offsets = [], [], []
        if add_special_tokens:
            ids, types, offsets = [cls_], [0], [(0, 0)]
        for type_id, part in enumerate([first] if second is None else [first, second]):
            ids += [i for i, _ in part]
            offsets += [o for _, o in part]
            types += [type_id] * len(part)
            if add_special_tokens:
                ids.append(sep)
                types.append(type_id)
                offsets.append((0, 0))
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * len(ids), "offset_mapping": offsets}

    def _pad(self, encoded: dict[str, list], length: int) -> dict[str, list]:
        missing = length - len(encoded["input_ids"])
        if missing <= 0:
            return encoded
        return {"input_ids": encoded["input_ids"] + [self.vocab[self.pad_token]] * missing,
                "token_type_ids": encoded["token_type_ids"] + [0] * missing,
                "attention_mask": encoded["attention_mask"] + [0] * missing,
                "offset_mapping": encoded["offset_mapping"] + [(0, 0)] * missing}


def wordpiece_pieces(word: str, vocab: dict[str, int], unk_id: int, prefix: str,
                     max_chars: int) -> list[tuple[Span, int]]:
    """Greedy longest-match-first pieces of one word as ((start, end) within the word, id); the whole word
    is the unknown token when it is longer than ``max_chars`` or some stretch matches nothing."""
    if len(word) > max_chars:
        return [((0, len(word)), unk_id)]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            candidate = word[start:end] if start == 0 else prefix + word[start:end]
            if candidate in vocab:
                pieces.append(((start, end), vocab[candidate]))
                break
            end -= 1
        else:
            return [((0, len(word)), unk_id)]
        start = end
    return pieces


class WordPiece:
    """The WordPiece model of the tokenizer.json pipeline: one pre-tokenized word -> ids."""

    def __init__(self, vocab: dict[str, int], unk_token: str = "[UNK]", continuing_subword_prefix: str = "##",
                 max_input_chars_per_word: int = 100) -> None:
        if unk_token not in vocab:
            raise TokenizerError(f"model.unk_token {unk_token!r} is not in the vocabulary")
        self.vocab, self.unk_id, self.prefix = vocab, vocab[unk_token], continuing_subword_prefix
        self.max_chars = max_input_chars_per_word

    def tokenize(self, word: str) -> list[int]:
        return [i for _, i in wordpiece_pieces(word, self.vocab, self.unk_id, self.prefix, self.max_chars)]


def _split_words(chars: list[tuple[str, int]]) -> list[Span]:
    """BERT pre-tokenization: whitespace separates words (and is dropped); punctuation stands alone."""
    spans, start = [], None
    for i, (char, _) in enumerate(chars):
        if char == " " or _is_whitespace(char):
            if start is not None:
                spans.append((start, i))
            start = None
        elif _is_punctuation(char):
            if start is not None:
                spans.append((start, i))
            spans.append((i, i + 1))
            start = None
        elif start is None:
            start = i
    if start is not None:
        spans.append((start, len(chars)))
    return spans


def _truncate(first: list, second: list | None, budget: int, strategy: str) -> tuple[list, list | None]:
    """Cut sequences to ``budget`` tokens in total, as the tokenizers library does."""
    if budget < 0:
        raise TokenizerError("max_length is too small to hold the special tokens")
    if second is None:
        if strategy == "only_second":
            raise TokenizerError("truncation='only_second' needs a text pair")
        return first[:budget], None
    n1, n2 = len(first), len(second)
    if n1 + n2 <= budget:
        return first, second
    if strategy == "only_first":
        if n2 > budget:
            raise TokenizerError(f"the second sequence ({n2} tokens) alone exceeds max_length")
        return first[:budget - n2], second
    if strategy == "only_second":
        if n1 > budget:
            raise TokenizerError(f"the first sequence ({n1} tokens) alone exceeds max_length")
        return first, second[:budget - n1]
    if strategy != "longest_first":
        raise TokenizerError(f"unknown truncation strategy {strategy!r}")
    short, long_ = sorted((n1, n2))
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short = budget // 2
        long_ = short + budget % 2
    keep_first, keep_second = (short, long_) if n1 <= n2 else (long_, short)
    return first[:keep_first], second[:keep_second]
