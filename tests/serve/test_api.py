"""The OpenAI-compatible API through the official `openai` client (pinned): every endpoint in process and
over a live socket, streaming equal to non-streaming, OpenAI error bodies for bad requests, 429 when the
queue is full, and a client that disconnects mid-stream freeing its blocks."""

import json
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from lmstack.serve.app import create_app
from tests.serve.conftest import LiveServer, make_server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


def fake_embed(texts):
    """Deterministic unit vectors from the text (the real encoder is tested on the live server)."""
    vectors = torch.stack([torch.sin(torch.arange(8.0) * (1 + len(t))) for t in texts])
    return torch.nn.functional.normalize(vectors, dim=-1), sum(len(t.split()) for t in texts)


@pytest.fixture(scope="module")
def server(chat_model_dir):
    s = make_server(chat_model_dir, embed=fake_embed)
    yield s
    s.runner.stop()


@pytest.fixture(scope="module")
def http(server):
    with TestClient(create_app(server)) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == ["tiny-chat", "embedder"]
    assert http.get("/health").json() == {"status": "ok"}


def test_chat_greedy_equals_generate(client, server):
    from lmstack.generate import GenerationConfig, generate

    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0)
    files = server.files
    prompt = files.tokenizer.encode(files.render_chat(MESSAGES), add_special_tokens=False)
    out = generate(files.model, torch.tensor([prompt]),
                   GenerationConfig(max_new_tokens=12, eos_token_id=files.stop_ids))[0, len(prompt):].tolist()
    ids = [t for t in out if t not in files.stop_ids]
    assert reply.choices[0].message.content == files.tokenizer.decode(ids, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(out)
    assert reply.choices[0].finish_reason == ("stop" if len(out) < 12 else "length")


def test_streaming_equals_the_whole_reply(client):
    whole = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]


def test_n_choices_seeds_and_logprobs(client):
    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, n=3, seed=5,
                                           logprobs=True, top_logprobs=2)
    again = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, n=3, seed=5,
                                           logprobs=True, top_logprobs=2)
    assert [c.message.content for c in reply.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in reply.choices}) > 1  # seed + index: different samples
    for choice in reply.choices:
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_completions_prompts_text_and_ids(client, server):
    ids = server.tokenizer.encode("the cat", add_special_tokens=False)
    a = client.completions.create(model="tiny-chat", prompt="the cat", max_tokens=5, temperature=0, logprobs=2)
    b = client.completions.create(model="tiny-chat", prompt=[ids, ids], max_tokens=5, temperature=0)
    assert a.choices[0].text == b.choices[0].text == b.choices[1].text
    assert len(a.choices[0].logprobs.tokens) == a.usage.completion_tokens
    streamed = client.completions.create(model="tiny-chat", prompt="the cat", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == a.choices[0].text


def test_stop_strings_cut_the_text(client):
    base = client.completions.create(model="tiny-chat", prompt="the cat", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"the tiny model's reply is too short to cut: {text!r}"
    cut = client.completions.create(model="tiny-chat", prompt="the cat", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-chat", prompt="the cat", max_tokens=12, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_embeddings_float_and_base64(client):
    plain = client.embeddings.create(model="embedder", input=["a b", "c"], encoding_format="float")
    packed = client.embeddings.create(model="embedder", input=["a b", "c"])  # the client's default: base64
    expected, tokens = fake_embed(["a b", "c"])
    for got in (plain, packed):
        torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), expected)
    assert plain.usage.prompt_tokens == tokens


BAD = [
    ({"messages": MESSAGES, "temperature": 5}, 400, "temperature"),
    ({"messages": MESSAGES, "temperature": False}, 400, "temperature"),  # strict: no bool -> float
    ({"messages": MESSAGES, "n": "2"}, 400, "n"),
    ({"messages": MESSAGES, "n": 99}, 400, "n"),
    ({"messages": []}, 400, "messages"),
    ({"messages": MESSAGES, "surprise": 1}, 400, "surprise"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": MESSAGES, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": MESSAGES, "model": "gpt-9"}, 404, "model"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format"),
    ({"messages": MESSAGES, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_chat_requests_get_openai_errors(http, body, status, param):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_json_and_other_bad_bodies(http):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        response = http.post(path, content=b'{"messages": [', headers={"content-type": "application/json"})
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": [], "model": "tiny-chat"}).status_code == 400
    assert http.post("/v1/completions", json={"prompt": [[1, 99999]]}).json()["error"]["param"] == "prompt"
    assert http.post("/v1/embeddings", json={"input": ""}).json()["error"]["param"] == "input"
    assert http.get("/v1/nothing").status_code == 404
    assert http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(chat_model_dir):
    server = make_server(chat_model_dir, max_waiting=0)
    try:
        with TestClient(create_app(server)) as http:
            response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
    finally:
        server.runner.stop()


def test_metrics_are_prometheus_text(http, client):
    client.completions.create(model="tiny-chat", prompt="a", max_tokens=2)
    text = http.get("/metrics").text
    for name in ("lmstack_requests_running", "lmstack_requests_waiting", "lmstack_kv_blocks_used",
                 "lmstack_generation_tokens_per_second", "lmstack_time_to_first_token_seconds_bucket",
                 "lmstack_inter_token_latency_seconds_count", "lmstack_request_latency_seconds_sum"):
        assert name in text
    assert 'lmstack_requests_finished_total{reason="length"}' in text


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def test_live_server_every_endpoint_and_a_disconnect(chat_model_dir):
    from lmstack.rag import SentenceEncoder
    from lmstack.recipes.bundled import resolve_model_dir

    try:
        encoder = SentenceEncoder(resolve_model_dir("all-minilm-l6-v2"))
    except Exception as error:  # the bundled encoder package is installed by `make install`
        pytest.skip(f"all-MiniLM-L6-v2 not installed: {error}")
    server = make_server(chat_model_dir, embed=lambda texts: (encoder.encode(texts), 0))
    original = server.files.model.hidden_states

    def slow_hidden_states(*args, **kwargs):  # 20 ms a step, so a long reply is still running when we leave
        time.sleep(0.02)
        return original(*args, **kwargs)

    live = LiveServer(server)
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "tiny-chat"
        reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
        stream = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == reply.choices[0].message.content
        assert client.completions.create(model="tiny-chat", prompt="the", max_tokens=3).usage.completion_tokens <= 3
        vectors = client.embeddings.create(model="embedder", input=["a cat", "a dog"])
        torch.testing.assert_close(torch.tensor([d.embedding for d in vectors.data]),
                                   encoder.encode(["a cat", "a dog"]), atol=1e-6, rtol=1e-5)
        server.files.model.hidden_states = slow_hidden_states
        never_stop = {str(i): -100 for i in server.files.stop_ids}  # so the reply runs all 200 tokens
        body = {"messages": MESSAGES, "max_tokens": 200, "temperature": 1.0, "stream": True, "logit_bias": never_stop}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and '"content": ""' not in line:  # generated text: it is running
                    assert _gauge(live.url, "lmstack_kv_blocks_used") > 0
                    break  # leaving the iteration closes the connection mid-stream
        deadline = time.time() + 5
        while _gauge(live.url, "lmstack_kv_blocks_used") > 0 or _gauge(live.url, "lmstack_requests_running") > 0:
            assert time.time() < deadline, "the disconnected request kept its blocks"
            time.sleep(0.05)
        assert 'reason="cancelled"' in httpx.get(live.url + "/metrics").text
    finally:
        server.files.model.hidden_states = original
        live.stop()


def test_a_sequence_the_engine_refuses_fails_alone(server, client):
    """A request that reaches the engine and is refused there (the handlers check first) fails by itself; the
    engine thread keeps serving everyone else."""
    import asyncio

    from lmstack.errors import ConfigError
    from lmstack.serve.sampling import SamplingParams

    async def submit_empty_prompt():
        handle = server.runner.submit([], SamplingParams())
        return await asyncio.wait_for(handle.outputs.get(), timeout=10)

    _, out = asyncio.run(submit_empty_prompt())
    assert isinstance(out, ConfigError) and server.runner.alive
    assert client.completions.create(model="tiny-chat", prompt="the", max_tokens=2).usage.completion_tokens >= 1


def test_json_object_mode_keeps_every_reply_valid_json(client, server):
    from lmstack.serve.json_mode import JSONPrefix

    bias = {str(server.tokenizer.token_to_id(c)): 30 for c in "{}"}  # steer the random model to "{}"
    steered = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=20, temperature=0,
                                             response_format={"type": "json_object"}, logit_bias=bias)
    assert json.loads(steered.choices[0].message.content) == {} and steered.choices[0].finish_reason == "stop"
    free = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=40, n=4, seed=1,
                                          response_format={"type": "json_object"})
    for choice in free.choices:
        state = JSONPrefix()
        assert state.feed(choice.message.content), choice.message.content  # a prefix of a JSON object
        if choice.finish_reason == "stop":
            assert state.complete and isinstance(json.loads(choice.message.content), dict)


def test_json_schema_mode_is_refused_for_now(http):
    body = {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
