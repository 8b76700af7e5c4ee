"""RAG: the prompt holds as many sources as fit the model's context (counted in its tokens), the answer
streams, and its [n] citations map back to the chunks shown."""

import pytest

from lmstack.checkpoints.model_files import open_model
from lmstack.errors import DataError
from lmstack.rag.answering import Answer, answer, build_prompt, cited, prompt_messages, stream_answer
from lmstack.rag.chat import LocalChat
from lmstack.rag.documents import Chunk
from lmstack.rag.retrieve import Hit
from tests.serve.conftest import chat_model_dir  # noqa: F401  (the tiny chat checkpoint fixture)


@pytest.fixture(scope="module")
def files(chat_model_dir):  # noqa: F811
    files = open_model(chat_model_dir)
    files.model.eval()
    return files


def hit(i, words=20):
    text = " ".join(["the model trains"] * words)
    return Hit(Chunk(f"doc{i}", 0, text, 0, len(text)), 1.0 / (i + 1), i + 1)


class FakeIndex:
    def __init__(self, hits):
        self.hits = hits

    def search(self, question, k, mode, where, fusion, rerank):
        return self.hits[:k]


def test_sources_are_added_best_first_while_they_fit(files):
    hits = [hit(i, 2) for i in range(12)]
    messages, used, left_out, tokens = build_prompt("What trains?", hits, files, 32, system="Cite sources.")
    limit = files.model.config.context_limit
    assert 0 < len(used) < len(hits) and used == hits[:len(used)] and left_out == hits[len(used):]
    ids = LocalChat(files).prompt_ids(messages)
    assert len(ids) == tokens and len(ids) + 32 <= limit
    more = LocalChat(files).prompt_ids(prompt_messages("What trains?", hits[:len(used) + 1], system="Cite sources."))
    assert len(more) + 32 > limit  # the next source really would not have fit
    assert files.tokenizer.decode(ids).count("[1] (doc0)") == 1


def test_a_question_that_cannot_fit_is_refused(files):
    with pytest.raises(DataError, match="exceeds the model's context"):
        build_prompt("why " * 300, [hit(0)], files, max_new_tokens=16)


def test_citations_are_the_sources_named():
    hits = [hit(i) for i in range(3)]
    found = cited("Models train [2]. Also [1, 3] and [9] and [2] again.", hits)
    assert [c.number for c in found] == [2, 1, 3] and found[0].chunk.doc_id == "doc1"
    assert cited("no citations here", hits) == []


def test_streamed_pieces_make_the_answer(files):
    pieces = list(stream_answer("What trains?", FakeIndex([hit(0, 1), hit(1, 1)]), files, k=2, max_new_tokens=12))
    *text, result = pieces
    assert isinstance(result, Answer) and all(isinstance(p, str) for p in text)
    assert "".join(text).strip() == result.text and len(result.sources) == 2 and result.prompt_tokens > 0
    again = answer("What trains?", FakeIndex([hit(0, 1), hit(1, 1)]), files, k=2, max_new_tokens=12)
    assert again.text == result.text  # greedy: the same answer
