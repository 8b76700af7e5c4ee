"""`lmstack serve`: the command starts a server that answers (a real process on a free port), and bad
flags are clear errors."""

import subprocess
import sys
import time

import httpx
import pytest

from lmstack.cli import main
from tests.serve.conftest import free_port


def test_the_command_serves_until_stopped(chat_model_dir):
    port = free_port()
    command = [sys.executable, "-c", "import sys; from lmstack.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--model", str(chat_model_dir), "--port", str(port), "--kv-blocks", "64",
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                           json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 3}).json()
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 3
        assert "web chat" in httpx.get(f"http://127.0.0.1:{port}/").text.lower()
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.parametrize("args,message", [
    (["--max-batch", "0"], "--max-batch=0 must be >= 1"),
    (["--kv-blocks", "-1"], "--kv-blocks=-1"),
    (["--activations", "int8"], "--activations int8 needs --quantize"),
    (["--port", "70000"], "--port"),
])
def test_bad_flags_are_clear_errors(chat_model_dir, capsys, args, message):
    assert main(["serve", "--model", str(chat_model_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_the_embedding_model_flag_serves_the_encoder(chat_model_dir):
    from pathlib import Path

    import torch

    from lmstack.rag import SentenceEncoder
    from lmstack.recipes.bundled import resolve_model_dir
    from lmstack.recipes.configs.serve import ServeConfig
    from lmstack.recipes.serve import build_server

    try:
        encoder = SentenceEncoder(resolve_model_dir("all-minilm-l6-v2"))
    except Exception as error:  # the bundled encoder package is installed by `make setup`
        pytest.skip(f"all-MiniLM-L6-v2 not installed: {error}")
    server = build_server(ServeConfig(model=Path(chat_model_dir), embedding_model=Path("all-minilm-l6-v2"),
                                      kv_blocks=16, fast_kernels=False))
    vectors, tokens = server.embed(["a cat", "a dog"])
    torch.testing.assert_close(vectors, encoder.encode(["a cat", "a dog"]))
    assert tokens > 4 and server.embedding_model_name == "all-minilm-l6-v2" and server.model_name == "tiny-chat"
