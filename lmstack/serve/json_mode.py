"""Constrained decoding for ``response_format: {"type": "json_object"}``: only tokens that keep the output a
prefix of a valid JSON object are allowed, and the end-of-sequence only once the object is closed.

``JSONPrefix`` is a character-level pushdown automaton for JSON (RFC 8259): it consumes text and says
whether the text so far can still be completed into one JSON object (whitespace allowed between tokens, at
most MAX_WHITESPACE characters in a row: a small model would otherwise spend its budget on newlines).
``JSONObjectConstraint`` turns it into a token mask per step:

    inside a string      tokens of plain string characters (no quote, backslash or control character) are
                         always allowed (precomputed); only the others are simulated
    elsewhere            the vocabulary trie is walked with the automaton, so a subtree is dropped at its
                         first impossible character (structural states allow few characters)
    object closed        only the end-of-sequence tokens

Tokens whose text is an incomplete UTF-8 sequence (byte pieces of a character) are never allowed: their
text is not known until the next token, so a character outside ASCII must come in one token.
"""

import torch

WHITESPACE = " \t\n\r"
MAX_WHITESPACE = 8  # consecutive whitespace characters between tokens (JSON allows any; a model can loop on them)
_LITERALS = ("true", "false", "null")
_HEX = set("0123456789abcdefABCDEF")


class JSONPrefix:
    """The state of a JSON text read so far. ``feed(text)`` returns False (state unchanged) when the text
    cannot continue a JSON object; ``complete`` is True once the top-level object is closed."""

    __slots__ = ("stack", "mode", "pending", "in_key", "complete", "started", "blank")

    def __init__(self) -> None:
        self.stack: list[str] = []  # "{" or "["
        # mode: "value" (a value expected), "key" (a key or "}"), "first_key" (a key or "}"), "colon",
        # "after" (after a value: "," or a closer), "string", "escape", "unicode", "number", "literal"
        self.mode, self.pending, self.complete, self.started = "start", "", False, False
        self.in_key = False  # the string being read is an object key (then a colon follows)
        self.blank = 0  # consecutive whitespace characters just read (at most MAX_WHITESPACE)

    def _slots(self):
        return [name for cls in type(self).__mro__ for name in getattr(cls, "__slots__", ())]

    def copy(self) -> "JSONPrefix":
        other = type(self).__new__(type(self))
        for name in self._slots():
            value = getattr(self, name)
            setattr(other, name, [list(v) if isinstance(v, list) else v for v in value]
                    if isinstance(value, list) else value)  # the stacks: one level of lists deep
        return other

    def feed(self, text: str) -> bool:
        trial = self.copy()
        for ch in text:
            if not trial._char(ch):
                return False
        for name in self._slots():
            setattr(self, name, getattr(trial, name))
        return True

    # ---- one character ----------------------------------------------------------------------------
    def _char(self, ch: str) -> bool:
        if self.complete:
            return ch in WHITESPACE
        mode = self.mode
        if mode == "string":
            return self._in_string(ch)
        if mode == "escape":
            if ch == "u":
                self.mode, self.pending = "unicode", ""
            elif ch in '"\\/bfnrt':
                self.mode = "string"
            else:
                return False
            return True
        if mode == "unicode":
            if ch not in _HEX:
                return False
            self.pending += ch
            if len(self.pending) == 4:
                self.mode, self.pending = "string", ""
            return True
        if mode == "number":
            if self._number_char(ch):
                return True
            if not self._number_can_end():
                return False
            self._value_done()
            return self._char(ch)
        if mode == "literal":
            word = next(w for w in _LITERALS if w.startswith(self.pending))
            if len(self.pending) < len(word):
                if word[len(self.pending)] != ch:
                    return False
                self.pending += ch
                if self.pending == word:
                    self._value_done()
                return True
        if ch in WHITESPACE:  # between tokens; not before the object (as xgrammar's JSON grammar)
            self.blank += 1
            return self.blank <= MAX_WHITESPACE and mode != "start"
        self.blank = 0
        return self._structural(ch)

    def _in_string(self, ch: str) -> bool:
        if ch == '"':
            if self.in_key:
                self.mode, self.in_key = "colon", False
            else:
                self._value_done()
            return True
        if ch == "\\":
            self.mode = "escape"
            return True
        return ord(ch) >= 0x20

    def _structural(self, ch: str) -> bool:
        mode = self.mode
        if mode == "start":
            if ch != "{":
                return False
            self.stack.append("{")
            self.mode, self.started = "first_key", True
            return True
        if mode in ("first_key", "key"):
            if ch == '"':
                self.mode, self.in_key = "string", True
                return True
            if ch == "}" and mode == "first_key":
                return self._close("{")
            return False
        if mode == "colon":
            if ch == ":":
                self.mode = "value"
                return True
            return False
        if mode == "after":
            if ch == ",":
                self.mode = "key" if self.stack[-1] == "{" else "value"
                return True
            if ch in "}]":
                return self._close("{" if ch == "}" else "[")
            return False
        if mode in ("value", "first_value"):
            return self._value_start(ch)
        return False

    def _value_start(self, ch: str) -> bool:
        if ch == '"':
            self.mode = "string"
            return True
        if ch == "{":
            self.stack.append("{")
            self.mode = "first_key"
            return True
        if ch == "[":
            self.stack.append("[")
            self.mode = "first_value"
            return True
        if ch == "]" and self.mode == "first_value":
            return self._close("[")
        if ch == "-" or ch.isdigit() and ch.isascii():
            self.mode, self.pending = "number", ch
            return True
        if any(w.startswith(ch) for w in _LITERALS):
            self.mode, self.pending = "literal", ch
            return True
        return False

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        self.pending = ""
        if not self.stack:
            self.complete, self.mode = True, "done"
        else:
            self.mode = "after"

    # ---- numbers: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)? ---------------------------------
    def _number_char(self, ch: str) -> bool:
        p = self.pending
        if ch.isdigit() and ch.isascii():
            if p in ("0", "-0"):
                return False  # no leading zeros
            self.pending += ch
            return True
        if ch == "." and "." not in p and "e" not in p.lower() and p[-1].isdigit():
            self.pending += ch
            return True
        if ch in "eE" and "e" not in p.lower() and p[-1].isdigit():
            self.pending += ch
            return True
        if ch in "+-" and p[-1] in "eE":
            self.pending += ch
            return True
        return False

    def free_string(self) -> bool:
        """Inside a string, may any plain character come next? (A schema's keys and enums restrict it.)"""
        return True

    def _number_can_end(self) -> bool:
        return self.pending[-1].isdigit()


class JSONVocabulary:
    """What every JSON-constrained request of one model shares, built once: each token's text, the tokens of
    plain string characters, the others, and a trie of the token texts.

    Args:
        token_texts: the text of every id of the output layer ("" for ids without text: special tokens, ids
            past the tokenizer's vocabulary).
        eos_ids: the tokens that end the reply (allowed only once the object is closed).
    """

    def __init__(self, token_texts: list[str], eos_ids: list[int]) -> None:
        self.texts, self.eos_ids, self.vocab_size = token_texts, list(eos_ids), len(token_texts)
        usable = [t != "" and "\ufffd" not in t for t in token_texts]
        self.plain = torch.tensor([u and all(c not in '"\\' and ord(c) >= 0x20 for c in t)
                                   for t, u in zip(token_texts, usable)], dtype=torch.bool)
        self.special = [i for i, u in enumerate(usable) if u and not self.plain[i]]
        self.trie: dict = {}
        for i, (t, u) in enumerate(zip(token_texts, usable)):
            if u:
                node = self.trie
                for ch in t:
                    node = node.setdefault(ch, {})
                node.setdefault(None, []).append(i)

    @classmethod
    def for_tokenizer(cls, tokenizer, eos_ids: list[int], vocab_size: int) -> "JSONVocabulary":
        size = min(getattr(tokenizer, "vocab_size", vocab_size), vocab_size)
        specials = set(eos_ids)
        is_special = getattr(tokenizer, "is_special", None)
        texts = [""] * vocab_size
        for i in range(size):
            if i not in specials and not (is_special and is_special(i)):
                texts[i] = tokenizer.decode([i], skip_special_tokens=False)
        return cls(texts, eos_ids)


class JSONObjectConstraint:
    """``SamplingParams.allowed_tokens`` for one JSON-object reply: (generated ids) -> (V,) bool mask.

    Args:
        vocabulary: the model's JSONVocabulary (shared by requests).
        state: where the reply starts: a JSONPrefix (any object), or a ``json_schema.SchemaPrefix``.
    """

    def __init__(self, vocabulary: JSONVocabulary, state: JSONPrefix | None = None) -> None:
        self.vocab, self.state, self.seen = vocabulary, state or JSONPrefix(), 0

    def __call__(self, generated: list[int]) -> torch.Tensor:
        for token in generated[self.seen:]:  # advance over the tokens chosen since the last call
            if token not in self.vocab.eos_ids and not self.state.feed(self.vocab.texts[token]):
                raise AssertionError(f"token {token} was outside the JSON mask")
        self.seen = len(generated)
        return self.allowed()

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the text a prefix of a JSON object (EOS once it is complete)."""
        vocab = self.vocab
        mask = torch.zeros(vocab.vocab_size, dtype=torch.bool)
        if self.state.complete:
            mask[vocab.eos_ids] = True
            return mask
        if self.state.mode == "string" and self.state.free_string():
            mask |= vocab.plain
            for i in vocab.special:
                if self.state.copy().feed(vocab.texts[i]):
                    mask[i] = True
            return mask
        _walk(vocab.trie, self.state, mask)
        return mask


def _walk(node: dict, state: JSONPrefix, mask: torch.Tensor) -> None:
    """Mark every token under ``node`` whose remaining characters ``state`` accepts."""
    for ch, child in node.items():
        if ch is None:
            mask[child] = True
            continue
        nxt = state.copy()
        if nxt._char(ch):
            _walk(child, nxt, mask)
