"""A tiny chat model on disk (random Llama + BPE tokenizer with ChatML tokens) and servers over it."""

import socket
import threading
import time

import pytest

from lmstack.checkpoints import save_hf
from lmstack.checkpoints.model_files import open_model
from lmstack.models import build_model
from lmstack.serve import Engine
from lmstack.serve.app import Server, create_app
from lmstack.serve.runner import EngineRunner
from lmstack.tokenizers import train_bpe
from tests.tokenizers.corpus import TRAIN


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    directory = save_hf(build_model("tiny-llama", seed=0), tmp_path_factory.mktemp("serve") / "tiny-chat")
    train_bpe(TRAIN * 2, 400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(directory)
    return directory


def make_server(directory, embed=None, max_waiting=64, **engine_options) -> Server:
    files = open_model(directory)
    files.model.eval()
    options = dict(num_blocks=128, block_size=8, max_batch=8, max_batch_tokens=64) | engine_options
    runner = EngineRunner(Engine(files.model, eos_token_ids=files.stop_ids, **options), max_waiting=max_waiting)
    return Server(files, runner.start(), "tiny-chat", embed, "embedder" if embed else None)  # the engine on a thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1 in a thread: the real socket path (streaming, disconnects)."""

    def __init__(self, server: Server) -> None:
        import uvicorn

        self.port = free_port()
        self.server = server
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port,
                                                     log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.uvicorn.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.server.runner.stop()
