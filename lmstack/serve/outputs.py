"""From engine tokens to OpenAI choices: incremental text, stop strings, log-probabilities.

A ``Choice`` follows one sequence. Each token re-decodes the sequence's ids (special tokens hidden) and
releases only text that is final: not the tail of an incomplete UTF-8 character, and not a tail that could
still grow into a stop string. When a stop string appears, the text is cut before it and the choice ends
with finish_reason "stop" (the caller tells the engine to free the sequence).
"""

from dataclasses import dataclass, field

from lmstack.serve.scheduler import StepOutput


@dataclass
class Choice:
    """The text of one sequence as it grows.

    Args:
        index: the choice's index in the response.
        tokenizer: ids -> text (``decode(ids, skip_special_tokens=True)``).
        stop: stop strings.
    """

    index: int
    tokenizer: object
    stop: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the final text so far (cut at a stop string)
    sent: int = 0  # characters of ``text`` already streamed
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # per token: (id, logprob, [(id, logprob), ...] | None)
    stopped_by_string: bool = False
    _prefix: int = 0  # incremental decoding window: ids[_prefix:_read] were decoded last time
    _read: int = 0
    _pending: bool = False  # the newest tokens end inside a character (held back)

    def add(self, out: StepOutput) -> None:
        """Take one engine output (a token and/or a finish reason)."""
        if out.sample is not None and not self.stopped_by_string:
            self.ids.append(out.sample.token)
            if out.sample.logprob is not None:
                self.logprobs.append((out.sample.token, out.sample.logprob, out.sample.top))
            searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self._extend_text()
            for stop in self.stop:
                cut = self.text.find(stop, searched_from)
                if cut >= 0:
                    self.text, self.stopped_by_string, self.finish_reason = self.text[:cut], True, "stop"
        if out.finish_reason is not None and self.finish_reason is None:
            self.finish_reason = out.finish_reason
        if self.done and self._pending and not self.stopped_by_string:  # the reply ended mid-character
            self._extend_text(final=True)

    def _extend_text(self, final: bool = False) -> None:
        """Append the text the newest tokens add, decoding only a short window (vLLM's incremental
        detokenization): decode(ids[prefix:]) minus decode(ids[prefix:read]), where ``read`` is where the text
        is complete and ``prefix`` the token before it, so a tokenizer that drops a sequence's leading space
        still sees its context. A window that ends inside a multi-byte character waits for the next token
        (unless ``final``: the reply ended there, and the text keeps the replacement character)."""
        before = self._decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = self._decode(self.ids[self._prefix:], skip_special_tokens=True)
        if not final and (after.endswith("\ufffd") or not after.startswith(before)):
            self._pending = True
            return
        if not after.startswith(before):  # final, and the window's start changed: decode the new ids alone
            after = before + self._decode(self.ids[self._read:], skip_special_tokens=True)
        self.text += after[len(before):]
        self._pending = False
        self._prefix, self._read = self._read, len(self.ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def delta(self) -> str:
        """Text that became final since the last call."""
        end = len(self.text)
        if not self.done:
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self.sent, end - hold)
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def token_text(self, token: int) -> str:
        return self._decode([token], skip_special_tokens=False)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # A model's output layer may be wider than its tokenizer (vocabularies padded to a multiple of 64):
        # ids past the tokenizer's have no text.
        size = getattr(self.tokenizer, "vocab_size", None)
        if size is not None:
            ids = [i for i in ids if i < size]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_logprobs(self, start: int = 0) -> dict | None:
        """OpenAI's chat ``logprobs`` object for tokens [start, ...)."""
        if not self.logprobs:
            return None
        content = []
        for token, logprob, top in self.logprobs[start:]:
            entry = self._entry(token, logprob)
            entry["top_logprobs"] = [self._entry(t, lp) for t, lp in (top or [])]
            content.append(entry)
        return {"content": content, "refusal": None}

    def completion_logprobs(self, start: int = 0) -> dict | None:
        """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
        if not self.logprobs:
            return None
        tokens, values, tops, offsets, offset = [], [], [], [], 0
        for token, logprob, top in self.logprobs[start:]:
            text = self.token_text(token)
            tokens.append(text)
            values.append(logprob)
            tops.append({self.token_text(t): lp for t, lp in (top or [])})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
