"""The chat models RAG and agents generate with: a model in this process, or a running ``lmstack serve``.

    model = LocalChat(open_model("smollm2.gguf"))           # lmstack.generate on the model's chat template
    model = ServerChat("http://127.0.0.1:8000")              # the same prompts over the OpenAI-compatible API
    text, n_tokens = model.complete(messages, "Thought:", stop=["Observation:"], max_new_tokens=64)
    for piece in model.stream(messages, max_new_tokens=256): ...
    model.count_tokens(messages), model.context_limit

Both render the prompt with the model's own chat template (the server renders it for ``ServerChat``), so an
answer or an agent's trace is the same text either way (greedy decoding; tested). ``continuation`` is the
assistant's turn so far: the prompt is the template with the assistant's turn opened, then that text, and
the reply continues it (``continue_final_message`` on the server, as vLLM names it). ``ServerChat`` also
talks to any server with vLLM's ``/tokenize`` and ``continue_final_message``.
"""

import dataclasses
import http.client
import json
import urllib.error
import urllib.request
from typing import Iterator, Protocol

import torch

from lmstack.errors import ConfigError, DataError
from lmstack.generate import GenerationConfig, generate, stream


class LanguageModel(Protocol):
    """What RAG and the ReAct agent need of a chat model."""

    context_limit: int

    def count_tokens(self, messages: list[dict], continuation: str = "") -> int:
        """Tokens of the prompt of ``messages`` (the assistant's turn opened, ``continuation`` after it)."""

    def complete(self, messages: list[dict], continuation: str, stop: list[str],
                 max_new_tokens: int) -> tuple[str, int]:
        """The text generated after the prompt, up to the first of ``stop`` (excluded); and how many tokens it
        took."""

    def stream(self, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
        """The reply's text, piece by piece as it is generated."""


class LocalChat:
    """A LanguageModel over lmstack ModelFiles (``lmstack.checkpoints.model_files.open_model``): greedy by
    default; ``config`` sets sampling."""

    def __init__(self, files, config: GenerationConfig | None = None) -> None:
        if files.tokenizer is None:
            raise ConfigError(f"{files.path}: generating chat replies needs the model's tokenizer")
        self.files, self.config = files, config or GenerationConfig()
        self.context_limit = getattr(files.model.config, "context_limit", None) or files.model.config.max_seq_len

    def prompt_ids(self, messages: list[dict], continuation: str = "") -> list[int]:
        return self.files.tokenizer.encode(self.files.render_chat(messages) + continuation, add_special_tokens=False)

    def count_tokens(self, messages, continuation=""):
        return len(self.prompt_ids(messages, continuation))

    def _config(self, max_new_tokens: int, **changes) -> GenerationConfig:
        return dataclasses.replace(self.config, max_new_tokens=max_new_tokens,
                                   eos_token_id=self.config.eos_token_id or self.files.stop_ids or None, **changes)

    def complete(self, messages, continuation, stop, max_new_tokens):
        ids = self.prompt_ids(messages, continuation)
        max_new_tokens = min(max_new_tokens, self.context_limit - len(ids))
        if max_new_tokens < 1:
            return "", 0
        config = self._config(max_new_tokens, stop_strings=list(stop) or None)
        # One row: generation ends when it does, so there is no padding to strip.
        new = generate(self.files.model, torch.tensor([ids]), config, tokenizer=self.files.tokenizer)[0, len(ids):]
        new = new.tolist()
        return _cut(self.files.tokenizer.decode(new, skip_special_tokens=True), stop), len(new)

    def stream(self, messages, max_new_tokens):
        ids = self.prompt_ids(messages)
        yield from stream(self.files.model, torch.tensor([ids]), self._config(max_new_tokens),
                          tokenizer=self.files.tokenizer, skip_special_tokens=True)


class ServerChat:
    """A LanguageModel over a running OpenAI-compatible server (``lmstack serve``; or vLLM): chat completions
    with ``continue_final_message``, prompt lengths from ``POST /tokenize``. Greedy (temperature 0) unless
    ``temperature`` is given.

    Raises (from every call): ConfigError when the server cannot be reached, DataError with the server's own
    message when it refuses a request (4xx / 5xx).
    """

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 temperature: float = 0.0, timeout: float = 300.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"server URL {url!r} must start with http:// or https://")
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.temperature, self.timeout = temperature, timeout
        self._limit: int | None = None

    @property
    def context_limit(self) -> int:
        if self._limit is None:
            self._limit = self._tokenize([{"role": "user", "content": ""}])["max_model_len"]
        return self._limit

    def count_tokens(self, messages, continuation=""):
        return self._tokenize(messages, continuation)["count"]

    def complete(self, messages, continuation, stop, max_new_tokens):
        room = self.context_limit - self.count_tokens(messages, continuation)
        if min(max_new_tokens, room) < 1:
            return "", 0
        body = self._body(messages, continuation, min(max_new_tokens, room), stop)
        reply = self._json("/v1/chat/completions", body)
        try:
            text, tokens = reply["choices"][0]["message"]["content"] or "", int(reply["usage"]["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise DataError(f"{self.url}/v1/chat/completions answered without choices[0].message.content and "
                            "usage.completion_tokens: not an OpenAI-compatible server?") from None
        return _cut(text, stop), tokens

    def stream(self, messages, max_new_tokens):
        with self._post("/v1/chat/completions", {**self._body(messages, "", max_new_tokens, []), "stream": True}) as r:
            try:
                for line in r:  # server-sent events: "data: {json}" lines, then "data: [DONE]"
                    line = line.decode("utf-8").strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[5:])["choices"]:
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            yield piece
            except (OSError, http.client.HTTPException) as error:
                raise ConfigError(f"the model server at {self.url} broke off the reply ({error})") from None
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{self.url}/v1/chat/completions streamed something other than OpenAI's "
                                "chat.completion.chunk events") from None

    def _body(self, messages, continuation, max_tokens, stop) -> dict:
        body = {"messages": _with_continuation(messages, continuation), "max_tokens": max_tokens,
                "temperature": self.temperature}
        if continuation:  # vLLM's extension: sent only when used, so plain OpenAI servers accept the rest
            body["continue_final_message"] = True
        if stop:
            body["stop"] = list(stop)
        return body

    def _tokenize(self, messages, continuation="") -> dict:
        body = {"messages": _with_continuation(messages, continuation), "continue_final_message": bool(continuation)}
        reply = self._json("/tokenize", body)
        if not (isinstance(reply, dict) and isinstance(reply.get("count"), int)
                and isinstance(reply.get("max_model_len"), int)):
            raise DataError(f"{self.url}/tokenize answered without count and max_model_len: ServerChat needs "
                            "vLLM's /tokenize (lmstack serve and vLLM have it)")
        return reply

    def _json(self, path: str, body: dict) -> dict:
        with self._post(path, body) as response:
            try:
                return json.loads(response.read())
            except ValueError:
                raise DataError(f"{self.url}{path} did not answer with JSON: not an OpenAI-compatible "
                                "server?") from None

    def _post(self, path: str, body: dict):
        if self.model:
            body = {**body, "model": self.model}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers, method="POST")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            raise DataError(f"{self.url}{path} refused the request ({error.code}): {_message(error)}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(f"cannot reach the model server at {self.url} ({reason}); start it with "
                              "`lmstack serve MODEL` or check --server") from None


def is_language_model(model) -> bool:
    """True for a LanguageModel (LocalChat, ServerChat, your own), False for ModelFiles."""
    return all(hasattr(model, name) for name in ("complete", "count_tokens", "stream"))  # (context_limit: a call)


def as_chat(model) -> LanguageModel:
    """``model`` itself when it is a LanguageModel, else ModelFiles wrapped in a LocalChat."""
    return model if is_language_model(model) else LocalChat(model)


def _with_continuation(messages: list[dict], continuation: str) -> list[dict]:
    return [*messages, {"role": "assistant", "content": continuation}] if continuation else list(messages)


def _cut(text: str, stop) -> str:
    for s in stop:
        text = text.split(s)[0]
    return text


def _message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return error.reason
