"""The OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI).

    POST /v1/chat/completions   messages rendered with the model's chat template; stream=True for SSE
    POST /v1/completions        a prompt (text or token ids), or several
    POST /v1/embeddings         with an embedding model (``embed``)
    GET  /v1/models, /health, /metrics (Prometheus text), /  (the web chat page)

Every bad request gets a 4xx with OpenAI's error body naming the field; a full queue gets 429 with
Retry-After. A client that disconnects cancels its sequences, which frees their KV blocks at once.
"""

import asyncio
import base64
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.errors import LmstackError
from lmstack.serve.json_mode import JSONObjectConstraint, JSONVocabulary
from lmstack.serve.json_schema import SchemaPrefix, schema_from_request
from lmstack.serve.outputs import Choice
from lmstack.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest, \
    error_body
from lmstack.serve.runner import EngineRunner, Handle
from lmstack.serve.sampling import SamplingParams

WEB_PAGE = Path(__file__).with_name("web") / "index.html"


class APIError(Exception):
    """An error answered with OpenAI's body: ``status``, message, the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


class Server:
    """What the routes share: the model's files, the engine runner, the served name, an embedder.

    Args:
        files: the loaded model (``ModelFiles``: model, tokenizer, chat template, stop ids).
        runner: the running engine.
        model_name: the id ``/v1/models`` lists and requests may name.
        embed: texts -> ((n, d) float tensor, tokens read), for ``/v1/embeddings``; None answers 404 there.
        embedding_model_name: its id.
    """

    def __init__(self, files, runner: EngineRunner, model_name: str,
                 embed: Callable[[list[str]], tuple[torch.Tensor, int]] | None = None,
                 embedding_model_name: str | None = None) -> None:
        self.files, self.runner, self.model_name = files, runner, model_name
        self.embed, self.embedding_model_name = embed, embedding_model_name
        self.tokenizer = files.tokenizer
        self.context = getattr(files.model.config, "context_limit", None)
        self.created = int(time.time())
        self._json_vocabulary: JSONVocabulary | None = None

    async def json_constraint(self, schema: dict | None = None) -> JSONObjectConstraint:
        """A fresh JSON-object constraint (to ``schema`` when given); the vocabulary it reads is built on first
        use (under a second for a 50k vocabulary, off the event loop) and shared by every later request."""
        eos = sorted(self.runner.engine.eos_token_ids)  # the tokens that end a reply: the engine's
        if not eos:
            raise APIError(400, "response_format json_object needs an end-of-sequence token, and this model has none",
                           "response_format")
        if self._json_vocabulary is None:
            self._json_vocabulary = await asyncio.to_thread(
                JSONVocabulary.for_tokenizer, self.tokenizer, eos, self.files.model.config.vocab_size)
        return JSONObjectConstraint(self._json_vocabulary, SchemaPrefix(schema) if schema is not None else None)

    # ---- requests -> engine -----------------------------------------------------------------------
    def check_model(self, name: str | None, embedding: bool = False) -> None:
        served = self.embedding_model_name if embedding else self.model_name
        if embedding and self.embed is None:
            raise APIError(404, "this server has no embedding model (start it with --embedding-model)", "model",
                           code="model_not_found")
        if name is not None and name != served:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}", "model",
                           code="model_not_found")

    def chat_prompt(self, body: ChatCompletionRequest | TokenizeRequest) -> list[int]:
        """The prompt's token ids: the chat template over ``body.messages``; with ``continue_final_message``, the
        messages before the last (the assistant's turn opened) followed by the last one's text, left open."""
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        opened = getattr(body, "add_generation_prompt", True)
        if body.continue_final_message:
            if messages[-1]["role"] != "assistant":
                raise APIError(400, "continue_final_message: the last message must be the assistant's (the text "
                               f"to continue), not {messages[-1]['role']!r}", "continue_final_message")
            messages, tail, opened = messages[:-1], messages[-1]["content"], True
        else:
            tail = ""
        try:
            text = (self.files.render_chat(messages, add_generation_prompt=opened) if messages else "") + tail
        except LmstackError as error:
            raise APIError(400, f"messages: {error}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def sampling(self, body, prompt: list[int], max_tokens: int | None, top_logprobs: int, logprobs: bool,
                 index: int) -> SamplingParams:
        room = (self.context - len(prompt)) if self.context else None
        if room is not None and room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the model's context is {self.context}",
                           "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if room is not None else 4096
        elif room is not None and max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {len(prompt)} tokens exceed the "
                           f"model's context of {self.context}", "max_tokens", code="context_length_exceeded")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= self.files.model.config.vocab_size:
                raise APIError(400, f"logit_bias key {key!r} is not a token id of this model", "logit_bias")
            bias[int(key)] = value
        temperature = 1.0 if body.temperature is None else body.temperature
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
            seed=None if body.seed is None else body.seed + index, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logprobs=logprobs, top_logprobs=top_logprobs, logit_bias=bias)
        try:
            self.runner.engine.check(prompt, params)
        except LmstackError as error:
            raise APIError(400, str(error), "max_tokens") from None
        return params

    def submit(self, prompts: list[tuple[list[int], SamplingParams]]) -> list[Handle]:
        if self.runner.error is not None:
            raise APIError(503, "the engine stopped after an internal error; restart the server", type_="server_error",
                           headers={"Retry-After": "30"})
        if self.runner.queue_full:
            raise APIError(429, "too many requests are waiting; retry shortly", type_="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        outputs: asyncio.Queue = asyncio.Queue()  # one for all of the request's sequences: (index, output)
        return [self.runner.submit(prompt, params, outputs, i) for i, (prompt, params) in enumerate(prompts)]


def _stops(stop) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else [s for s in stop if s]


DISCONNECTED = object()


async def _watch(request: Request, outputs: asyncio.Queue) -> None:
    """Every half second, check that the client is still there; if not, wake the handler with DISCONNECTED."""
    while True:
        await asyncio.sleep(0.5)
        if await request.is_disconnected():
            outputs.put_nowait((-1, DISCONNECTED))
            return


async def _updates(server: Server, handles: list[Handle], choices: list[Choice],
                   request: Request) -> AsyncIterator[int]:
    """Feed the engine's outputs (one queue for all of a request's sequences) into the choices; yield the
    index of each choice that changed, until the engine is done with all of them. However it ends (the
    client went away, the caller closed this generator, an error), the sequences still running are
    cancelled, which frees their blocks."""
    outputs, ended = handles[0].outputs, set()
    watcher = asyncio.ensure_future(_watch(request, outputs))
    try:
        while len(ended) < len(handles):
            i, out = await outputs.get()
            if out is DISCONNECTED:
                return
            if out is None:  # the engine delivered everything for this sequence
                ended.add(i)
                if not choices[i].done:
                    choices[i].finish_reason = "stop"
                continue
            if isinstance(out, LmstackError):  # the engine refused the sequence
                raise APIError(400, str(out))
            if isinstance(out, BaseException):
                raise APIError(500, f"the engine failed: {out}", type_="server_error")
            was_done = choices[i].done
            choices[i].add(out)
            if choices[i].stopped_by_string and not was_done:
                server.runner.finish(handles[i])
            yield i
    finally:
        watcher.cancel()
        for i, handle in enumerate(handles):
            if i not in ended:
                server.runner.cancel(handle)


async def _collect(server: Server, handles: list[Handle], choices: list[Choice], request: Request) -> None:
    async with contextlib.aclosing(_updates(server, handles, choices, request)) as updates:
        async for _ in updates:
            pass


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _chat_chunk(server: Server, rid: str, created: int, choices: list[dict]) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
            "system_fingerprint": None, "choices": choices}


async def chat_completions(server: Server, body: ChatCompletionRequest, request: Request):
    server.check_model(body.model)
    json_mode = body.response_format is not None and body.response_format.type != "text"
    schema = None
    if json_mode and body.response_format.type == "json_schema":
        try:
            schema = schema_from_request(body.response_format.json_schema)
        except ValueError as error:
            raise APIError(400, f"response_format.json_schema: {error}", "response_format") from None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    prompt = server.chat_prompt(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = body.top_logprobs or 0
    params = [server.sampling(body, prompt, max_tokens, top, body.logprobs, i) for i in range(body.n)]
    if json_mode:  # only tokens that keep the reply a prefix of a JSON object (that the schema accepts)
        for p in params:
            p.allowed_tokens = await server.json_constraint(schema)
    handles = server.submit([(prompt, p) for p in params])
    choices = [Choice(i, server.tokenizer, _stops(body.stop)) for i in range(body.n)]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        await _collect(server, handles, choices, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                "system_fingerprint": None,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                             "logprobs": c.chat_logprobs() if body.logprobs else None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": _usage(len(prompt), choices)}

    async def events() -> AsyncIterator[str]:
        sent_logprobs = [0] * len(choices)
        for i in range(len(choices)):
            yield _sse(_chat_chunk(server, rid, created, [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]))
        async with contextlib.aclosing(_updates(server, handles, choices, request)) as updates:
            async for i in updates:
                choice = choices[i]
                piece = choice.delta()
                entry = {"index": i, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
                if body.logprobs and len(choice.logprobs) > sent_logprobs[i]:
                    entry["logprobs"] = choice.chat_logprobs(sent_logprobs[i])
                    sent_logprobs[i] = len(choice.logprobs)
                if piece or entry["logprobs"]:
                    yield _sse(_chat_chunk(server, rid, created, [entry]))
                if choice.done:
                    yield _sse(_chat_chunk(server, rid, created, [
                        {"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}]))
        if body.stream_options is not None and body.stream_options.include_usage:
            chunk = _chat_chunk(server, rid, created, [])
            chunk["usage"] = _usage(len(prompt), choices)
            yield _sse(chunk)
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


async def completions(server: Server, body: CompletionRequest, request: Request):
    server.check_model(body.model)
    if body.echo:
        raise APIError(400, "echo is not supported by this server", "echo")
    prompts = _completion_prompts(server, body.prompt)
    top = body.logprobs or 0
    jobs, choices = [], []
    for p, prompt in enumerate(prompts):
        for j in range(body.n):
            index = p * body.n + j
            jobs.append((prompt, server.sampling(body, prompt, body.max_tokens, top, body.logprobs is not None, index)))
            choices.append(Choice(index, server.tokenizer, _stops(body.stop)))
    handles = server.submit(jobs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)

    def chunk(entries: list[dict]) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                "system_fingerprint": None, "choices": entries}

    if not body.stream:
        await _collect(server, handles, choices, request)
        out = chunk([{"index": c.index, "text": c.text, "logprobs": c.completion_logprobs() if top or
                      body.logprobs == 0 else None, "finish_reason": c.finish_reason} for c in choices])
        out["usage"] = _usage(prompt_tokens, choices)
        return out

    async def events() -> AsyncIterator[str]:
        async with contextlib.aclosing(_updates(server, handles, choices, request)) as updates:
            async for i in updates:
                piece = choices[i].delta()
                if piece or choices[i].done:
                    yield _sse(chunk([{"index": i, "text": piece, "logprobs": None,
                                       "finish_reason": choices[i].finish_reason}]))
        if body.stream_options is not None and body.stream_options.include_usage:
            last = chunk([])
            last["usage"] = _usage(prompt_tokens, choices)
            yield _sse(last)
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


def _completion_prompts(server: Server, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = [server.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompt]
    vocab = server.files.model.config.vocab_size
    for ids in out:
        if not ids:
            raise APIError(400, "prompt: an empty prompt (it encodes to no tokens)", "prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
    return out


def tokenize(server: Server, body: TokenizeRequest) -> dict:
    server.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", "prompt")
    if body.prompt is not None:
        if body.continue_final_message:
            raise APIError(400, "continue_final_message applies to messages, not to a prompt",
                           "continue_final_message")
        tokens = server.tokenizer.encode(body.prompt, add_special_tokens=False)
    else:
        tokens = server.chat_prompt(body)
    limit = server.context or server.files.model.config.max_seq_len  # None: dynamic RoPE; report the trained length
    return {"count": len(tokens), "max_model_len": limit, "tokens": tokens}


async def embeddings(server: Server, body: EmbeddingRequest):
    server.check_model(body.model, embedding=True)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(x, str) for x in inputs):
        raise APIError(400, "input: this server embeds text; token-id inputs are not supported", "input")
    if any(not x for x in inputs):
        raise APIError(400, "input: an empty string cannot be embedded", "input")
    vectors, tokens = await asyncio.to_thread(server.embed, inputs)
    if body.dimensions is not None:
        if body.dimensions > vectors.shape[1]:
            raise APIError(400, f"dimensions={body.dimensions} exceeds the model's {vectors.shape[1]}", "dimensions")
        vectors = torch.nn.functional.normalize(vectors[:, :body.dimensions], dim=-1)
    data = []
    for i, vector in enumerate(vectors.float()):
        value = (base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                 else vector.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": server.embedding_model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _param(location) -> str | None:
    parts = [str(p) for p in location if p not in ("body",)]
    return ".".join(parts) if parts else None


ERRORS = {400: {"description": "a bad request: OpenAI's error body, naming the field (param)"},
          404: {"description": "an unknown model"},
          429: {"description": "the queue is full; retry after the Retry-After header's seconds"},
          503: {"description": "the engine stopped"}}
STREAMED = {200: {"description": "the completion; with stream: true, server-sent events ending in data: [DONE]",
                  "content": {"application/json": {}, "text/event-stream": {}}}} | ERRORS


def create_app(server: Server) -> FastAPI:
    """The FastAPI application over ``server`` (its runner must be started)."""
    app = FastAPI(title="lmstack", description="OpenAI-compatible API over lmstack's continuous-batching engine")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        param = _param(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {first.get('msg')}").response()
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        type_ = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type_=type_).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type_="server_error").response()

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def _chat(body: ChatCompletionRequest, request: Request):
        return await chat_completions(server, body, request)

    @app.post("/v1/completions", responses=STREAMED)
    async def _completions(body: CompletionRequest, request: Request):
        return await completions(server, body, request)

    @app.post("/tokenize", responses=ERRORS)
    async def _tokenize(body: TokenizeRequest):
        return tokenize(server, body)

    @app.post("/v1/embeddings", responses=ERRORS)
    async def _embeddings(body: EmbeddingRequest):
        return await embeddings(server, body)

    @app.get("/v1/models")
    async def _models():
        names = [server.model_name] + ([server.embedding_model_name] if server.embed is not None else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": server.created,
                                            "owned_by": "lmstack"} for n in names]}

    @app.get("/health", responses={503: ERRORS[503]})
    async def _health():
        if not server.runner.alive:
            return JSONResponse({"status": "error", "detail": str(server.runner.error)}, 503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def _metrics():
        return server.runner.metrics.render()

    @app.get("/", response_class=HTMLResponse)
    async def _page():
        return WEB_PAGE.read_text(encoding="utf-8") if WEB_PAGE.is_file() else "<p>lmstack</p>"

    return app
