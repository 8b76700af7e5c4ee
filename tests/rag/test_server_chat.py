"""ServerChat (a running lmstack serve) gives what LocalChat (the model in this process) gives: prompt token
counts, greedy completions continued from the assistant's turn and cut at stop strings, streamed replies, RAG
answers and a ReAct trace; the server's /tokenize and continue_final_message; unreachable / refusing servers."""

import json
import urllib.error
import urllib.request

import pytest

from lmstack.agents import ReActAgent
from lmstack.checkpoints.model_files import open_model
from lmstack.errors import ConfigError, DataError
from lmstack.rag.answering import answer
from lmstack.rag.chat import LocalChat, ServerChat
from tests.rag.test_answering import FakeIndex, hit
from tests.serve.conftest import LiveServer, chat_model_dir, free_port, make_server  # noqa: F401

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the model do?"}]


@pytest.fixture(scope="module")
def chats(chat_model_dir):  # noqa: F811
    files = open_model(chat_model_dir)
    files.model.eval()
    live = LiveServer(make_server(chat_model_dir))
    yield LocalChat(files), ServerChat(live.url), live.url
    live.stop()


def test_prompt_lengths_and_context_match(chats):
    local, remote, _ = chats
    assert remote.context_limit == local.context_limit
    assert remote.count_tokens(MESSAGES) == local.count_tokens(MESSAGES)
    assert remote.count_tokens(MESSAGES, "Thought: the") == local.count_tokens(MESSAGES, "Thought: the")


def test_greedy_completions_continue_the_turn_and_stop_alike(chats):
    local, remote, _ = chats
    text, tokens = local.complete(MESSAGES, "Thought:", [], 16)
    assert (text, tokens) == remote.complete(MESSAGES, "Thought:", [], 16) and tokens == 16
    stop = text.strip()[2:4]  # a string the reply is known to contain
    cut, _ = local.complete(MESSAGES, "Thought:", [stop], 16)
    assert cut == text.split(stop)[0] and remote.complete(MESSAGES, "Thought:", [stop], 16)[0] == cut


def test_streamed_replies_and_rag_answers_match(chats):
    local, remote, _ = chats
    assert "".join(remote.stream(MESSAGES, 12)) == "".join(local.stream(MESSAGES, 12))
    index = FakeIndex([hit(0, 1), hit(1, 1)])
    here = answer("What trains?", index, local.files, k=2, max_new_tokens=12)
    there = answer("What trains?", index, remote, k=2, max_new_tokens=12)
    assert there.text == here.text and there.prompt_tokens == here.prompt_tokens
    assert [h.chunk.doc_id for h in there.sources] == [h.chunk.doc_id for h in here.sources]
    with pytest.raises(ConfigError, match="takes its own settings"):
        answer("What trains?", index, remote, config=local.config)


def test_a_react_trace_is_the_same_over_the_server(chats):
    local, remote, _ = chats
    # No tools and a bare system prompt: the full format would not fit the tiny model's 256-token context
    # (tests/recipes/test_agent_recipe.py runs the full one on a model with a longer context).
    here = ReActAgent(local, [], max_steps=2, step_tokens=12, system="{tools}").run("What is 2 + 2?")
    there = ReActAgent(remote, [], max_steps=2, step_tokens=12, system="{tools}").run("What is 2 + 2?")
    assert len(here.steps) == 2 and here.tokens == 24  # two turns really generated
    assert there.transcript == here.transcript and there.stopped == here.stopped and there.tokens == here.tokens


def _post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_server_refuses_bad_tokenize_and_continuation_requests(chats):
    _, _, url = chats
    code, body = _post(url + "/tokenize", {})
    assert code == 400 and "either prompt or messages" in body["error"]["message"]
    code, body = _post(url + "/v1/chat/completions", {"messages": MESSAGES, "continue_final_message": True})
    assert code == 400 and body["error"]["param"] == "continue_final_message"
    code, body = _post(url + "/tokenize", {"prompt": "the model", "continue_final_message": True})
    assert code == 400 and body["error"]["param"] == "continue_final_message"
    code, body = _post(url + "/tokenize", {"prompt": "the model"})
    assert code == 200 and body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] > 0


def test_unreachable_and_refusing_servers_are_named(chats):
    _, _, url = chats
    with pytest.raises(ConfigError, match="cannot reach the model server"):
        ServerChat(f"http://127.0.0.1:{free_port()}").count_tokens(MESSAGES)
    with pytest.raises(ConfigError, match="must start with http"):
        ServerChat("localhost:8000")
    with pytest.raises(DataError, match="refused the request \\(404\\).*does not exist"):
        ServerChat(url, model="another-model").count_tokens(MESSAGES)


def test_a_server_that_is_not_openai_compatible_is_named():
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.end_headers()
            length = int(self.headers["Content-Length"])
            streamed = json.loads(self.rfile.read(length)).get("stream")
            self.wfile.write(b"<html>hello</html>" if self.path == "/tokenize"
                             else b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: {broken\n\n' if streamed
                             else b'{"unexpected": 1}')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        chat = ServerChat(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(DataError, match="did not answer with JSON"):
            chat.count_tokens(MESSAGES)
        chat._limit = 100  # past /tokenize: the completion reply itself is checked too
        chat.count_tokens = lambda messages, continuation="": 10
        with pytest.raises(DataError, match="without choices"):
            chat.complete(MESSAGES, "", [], 8)
        pieces = chat.stream(MESSAGES, 8)
        assert next(pieces) == "hi"
        with pytest.raises(DataError, match="streamed something other than"):
            next(pieces)
    finally:
        server.shutdown()
