"""Loading text / Markdown / JSONL documents and cutting them into chunks that are exact slices."""

import pytest

from lmstack.errors import ConfigError, DataError
from lmstack.rag.documents import Document, chunk_documents, load_documents, sentence_spans, token_spans


def words(text):  # one token a word: the counts are easy to check by eye
    return len(text.split())


def test_load_a_directory(docs_dir):
    docs = load_documents(docs_dir)
    assert [d.id for d in docs] == ["cooking.txt", "faq-lora", "faq-dpo", "faq-moe", "quant/int8.txt", "train.md"]
    lora = next(d for d in docs if d.id == "faq-lora")
    assert lora.metadata == {"source": "faq.jsonl", "topic": "peft"}
    assert next(d for d in docs if d.id == "quant/int8.txt").metadata == {"source": "quant/int8.txt"}


@pytest.mark.parametrize("write, message", [
    (lambda d: None, "no text to index"),
    (lambda d: (d / "a.txt").write_text("   \n"), "no text to index"),
    (lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n'), "a.jsonl:2: each row needs"),
    (lambda d: (d / "a.jsonl").write_text('{"text": "ok"\n'), "a.jsonl:1: not valid JSON"),
    (lambda d: (d / "a.txt").write_bytes(b"\xff\xfe bad"), "not UTF-8"),
    (lambda d: (d / "a.jsonl").write_text('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n'), "share the id"),
])
def test_bad_corpora_are_named(tmp_path, write, message):
    write(tmp_path)
    with pytest.raises(DataError, match=message):
        load_documents(tmp_path)


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_documents(tmp_path / "nope")
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError, match="not a supported document"):
        load_documents(tmp_path / "x.pdf")


def test_token_windows_respect_size_and_overlap():
    text = " ".join(f"w{i}" for i in range(20))
    spans = token_spans(text, words, size=6, overlap=2)
    pieces = [text[a:b].split() for a, b in spans]
    assert all(len(p) <= 6 for p in pieces)
    assert pieces[0] == [f"w{i}" for i in range(6)] and pieces[1][:2] == ["w4", "w5"]  # two words shared
    assert pieces[-1][-1] == "w19"
    covered = {w for p in pieces for w in p}
    assert covered == set(text.split())


def test_a_word_longer_than_a_chunk_is_its_own_chunk():
    spans = token_spans("a bbbbbbbb c", lambda w: len(w), size=3, overlap=0)
    assert [("a bbbbbbbb c")[s:e] for s, e in spans] == ["a", "bbbbbbbb", "c"]


def test_sentences_are_packed_whole():
    text = "One two three. Four five! Six seven eight nine ten eleven twelve thirteen. \"Quoted end.\" Last one?"
    spans = sentence_spans(text, words, size=5)
    pieces = [text[a:b] for a, b in spans]
    assert pieces[0] == "One two three. Four five!"
    assert pieces[-1] == "\"Quoted end.\" Last one?"
    assert all(words(p) <= 5 for p in pieces)  # the 8-word sentence was cut by tokens


def test_chunks_are_exact_slices_with_heading_metadata(docs_dir):
    docs = load_documents(docs_dir)
    for how in ("tokens", "sentences", "headings"):
        chunks = chunk_documents(docs, words, how, size=12, overlap=3)
        by_id = {d.id: d for d in docs}
        assert all(by_id[c.doc_id].text[c.start:c.end] == c.text for c in chunks)
        assert len({c.id for c in chunks}) == len(chunks)
    headings = [c.metadata.get("heading") for c in chunk_documents(docs, words, "headings", 40) if c.doc_id == "train.md"]
    assert headings == ["Training", "Resuming"]


def test_bad_chunking_options():
    doc = [Document("a", "some text")]
    with pytest.raises(ConfigError, match="unknown chunking"):
        chunk_documents(doc, words, "pages")
    with pytest.raises(ConfigError, match="overlap < size"):
        chunk_documents(doc, words, "tokens", size=4, overlap=4)
