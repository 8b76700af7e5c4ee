"""`lmstack agent`: the tools it is given run (a scripted model calls each), the trace is printed or written as
JSON, a running server gives the same trace as the local model, and bad flags are named."""

import dataclasses
import json

import pytest

from lmstack.checkpoints import save_hf
from lmstack.cli import main
from lmstack.models import build_model
from lmstack.models.presets import get_preset
from lmstack.recipes import agent as agent_recipe
from lmstack.tokenizers import train_bpe
from tests.agents.test_react import Scripted, call
from tests.rag.conftest import docs_dir, encoder  # noqa: F401
from tests.serve.conftest import LiveServer, chat_model_dir, make_server  # noqa: F401
from tests.tokenizers.corpus import TRAIN


@pytest.fixture(scope="module")
def long_chat_dir(tmp_path_factory):
    """The tiny chat model with a 2048-token context: the agent's instructions and tool schemas fit."""
    config = dataclasses.replace(get_preset("tiny-llama"), max_seq_len=2048)
    directory = save_hf(build_model(config, seed=0), tmp_path_factory.mktemp("agent") / "tiny-chat")
    train_bpe(TRAIN * 2, 400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(directory)
    return directory


@pytest.fixture
def index_dir(tmp_path, docs_dir, encoder, capsys):  # noqa: F811
    out = tmp_path / "index"
    assert main(["rag", "index", str(docs_dir), "--out", str(out), "--chunk-size", "48", "--no-progress"]) == 0
    capsys.readouterr()
    return out


def test_every_tool_given_runs_and_the_trace_is_printed(index_dir, docs_dir, chat_model_dir, capsys,  # noqa: F811
                                                        monkeypatch):
    model = Scripted(call("calculator", expression="0.17 * 2350"), call("read_file", path="train.md"),
                     call("search", query="resume training"), " I know it.\nFinal Answer: 399.5")
    monkeypatch.setattr(agent_recipe, "open_chat_model", lambda cfg: model)
    assert main(["agent", "What is 17% of 2350?", "--model", str(chat_model_dir), "--files", str(docs_dir),
                 "--index", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert "Observation: 399.5" in out and "answer: 399.5" in out
    assert "resume" in out.split("[2]")[1].split("[3]")[0].lower()  # the file's text came back
    assert "train.md#" in out.split("[3]")[1]  # retrieval lists chunk ids
    system = model.seen[0][0][0]["content"]
    assert all(f'"name": "{name}"' in system for name in ("calculator", "read_file", "search"))


def test_json_trace_and_the_same_trace_through_a_server(long_chat_dir, capsys):
    ask = ["agent", "What is 2 + 2?", "--max-steps", "2", "--max-new-tokens", "12", "--json"]
    assert main([*ask, "--model", str(long_chat_dir), "--no-fast-kernels"]) == 0
    here = json.loads(capsys.readouterr().out)
    assert here["stopped"] == "max_steps" and len(here["steps"]) == 2 and here["tokens"] == 24
    live = LiveServer(make_server(long_chat_dir, num_blocks=512))
    try:
        assert main([*ask, "--server", live.url]) == 0
        assert json.loads(capsys.readouterr().out) == here
    finally:
        live.stop()


@pytest.mark.parametrize("argv, message", [
    (["--no-calculator"], "the agent has no tools"),
    (["--files", "/nonexistent/dir"], "needs an existing directory"),
    (["--max-steps", "0"], "--max-steps 0 must be at least 1"),
    (["--server", "http://127.0.0.1:1"], "--model PATH or --server URL"),
])
def test_bad_flags_are_named(chat_model_dir, capsys, argv, message):  # noqa: F811
    assert main(["agent", "q", "--model", str(chat_model_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_model_or_a_server_is_needed(capsys):
    assert main(["agent", "q"]) == 2
    assert "--model PATH or --server URL" in capsys.readouterr().err
