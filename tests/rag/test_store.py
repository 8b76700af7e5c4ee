"""The persistent index: reopened in a new object it searches the same; documents are added, replaced and
deleted; a run that dies mid-way leaves the last committed state; corrupted files and another embedding
model are refused with a clear error."""

import pytest
import torch

from lmstack.errors import CheckpointError, ConfigError, DataError
from lmstack.rag import Document, Index, SentenceEncoder, load_documents
from lmstack.rag.store import ChunkStore
from lmstack.recipes.bundled import resolve_model_dir


@pytest.fixture
def built(tmp_path, docs_dir, encoder):
    return Index.build(tmp_path / "index", load_documents(docs_dir), encoder, encoder_name="all-minilm-l6-v2",
                       size=32, overlap=8)


def ids(hits):
    return [h.chunk.id for h in hits]


def test_dense_bm25_and_hybrid_find_the_right_passage(built):
    for mode in ("dense", "bm25", "hybrid"):
        assert ids(built.search("how do I resume from a checkpoint?", k=3, mode=mode))[0].startswith("train.md")
    assert ids(built.search("cook spaghetti", k=1))[0] == "cooking.txt#0"  # meaning, not words: dense
    assert built.search("zebra xylophone", k=3, mode="bm25") == []  # no shared word, no lexical hit


def test_dense_scores_are_the_cosines(built, encoder):
    hits = built.search("int8 memory", k=2)
    query = encoder.encode(["int8 memory"])[0]
    for hit in hits:
        assert hit.score == pytest.approx(float(encoder.encode([hit.chunk.text])[0] @ query), abs=1e-5)


def test_metadata_filters(built):
    hits = built.search("training models", k=5, where={"topic": ["peft", "align"]})
    assert {h.chunk.doc_id for h in hits} == {"faq-lora", "faq-dpo"}
    assert built.search("anything", k=5, where={"topic": "none"}) == []
    assert {h.chunk.doc_id for h in built.search("x y", k=5, mode="hybrid", where={"source": "cooking.txt"})} <= \
        {"cooking.txt"}


def test_reopened_index_searches_the_same(built, encoder):
    before = built.search("quantization", k=4, mode="hybrid")
    built.store.close()
    again = Index.open(built.store.directory, encoder)
    assert [(h.chunk, h.score) for h in again.search("quantization", k=4, mode="hybrid")] == \
        [(h.chunk, h.score) for h in before]


def test_update_and_delete(built, encoder):
    n = len(built)
    built.add([Document("cooking.txt", "Bake the bread at two hundred degrees for forty minutes.",
                        {"source": "cooking.txt"})], size=32, overlap=8)
    assert len(built) == n  # replaced, not added beside the old one
    assert "bread" in built.search("baking", k=1)[0].chunk.text
    assert built.delete(["cooking.txt"]) == 1 and "cooking.txt" not in built.store.documents()
    built.store.compact()
    again = Index.open(built.store.directory, encoder)
    assert len(again) == n - 1 and again.store.committed == n - 1
    assert all(h.chunk.doc_id != "cooking.txt" for h in again.search("bread pasta cooking", k=10))


def test_a_run_killed_between_commits_keeps_what_it_finished(tmp_path, encoder, monkeypatch):
    docs = [Document(f"d{i}", f"Document number {i} talks about topic {i % 7}.") for i in range(40)]
    index = Index.build(tmp_path / "index", docs[:5], encoder, encoder_name="e", size=32, overlap=8)
    calls = {"n": 0}
    original = encoder.encode

    def dies_on_third_group(texts, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a killed process does to the rest of the run
        return original(texts, **kw)

    monkeypatch.setattr(encoder, "encode", dies_on_third_group)
    with pytest.raises(KeyboardInterrupt):
        index.add(docs[5:], batch_size=2)  # groups of 8 chunks: two commit, the third never does
    monkeypatch.undo()
    again = Index.open(tmp_path / "index", encoder)
    assert again.store.documents() == sorted(f"d{i}" for i in range(5 + 16))
    assert len(again.search("topic 3", k=50)) == 21


def test_vectors_written_but_never_committed_are_ignored(tmp_path, encoder, monkeypatch):
    index = Index.build(tmp_path / "index", [Document("a", "first text")], encoder, encoder_name="e")
    real_add = ChunkStore.add

    def torn(self, chunks, vectors):  # the vectors reach the file, then the process dies before the commit
        with open(self.vector_path, "r+b") as f:
            f.seek(self.committed * self.dim * 4)
            f.write(vectors.numpy().tobytes())
        raise KeyboardInterrupt

    monkeypatch.setattr(ChunkStore, "add", torn)
    with pytest.raises(KeyboardInterrupt):
        index.add([Document("b", "second text")])
    monkeypatch.setattr(ChunkStore, "add", real_add)
    again = Index.open(tmp_path / "index", encoder)
    assert again.store.documents() == ["a"] and again.store.committed == 1
    again.add([Document("c", "third text")])  # the torn tail is overwritten
    assert again.store.vector_path.stat().st_size == 2 * again.store.dim * 4
    assert ids(Index.open(tmp_path / "index", encoder).search("third", k=1)) == ["c#0"]


def test_corrupted_files_are_named(built, encoder):
    directory = built.store.directory
    vectors = built.store.vector_path
    built.store.close()
    data = vectors.read_bytes()
    vectors.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        Index.open(directory, encoder)
    vectors.write_bytes(data)
    database = directory / "store.sqlite"
    saved = database.read_bytes()
    database.write_bytes(b"not a database at all" * 100)
    with pytest.raises(CheckpointError, match="corrupted index database"):
        Index.open(directory, encoder)
    database.write_bytes(saved)
    assert len(Index.open(directory, encoder)) > 0  # restored: the good state was never overwritten
    with pytest.raises(CheckpointError, match="not an lmstack index"):
        Index.open(directory / "nowhere", encoder)


def test_another_embedding_model_is_refused(built):
    other = SentenceEncoder(resolve_model_dir("all-minilm-l6-v2"), pooling="cls")  # same size, other vectors
    with pytest.raises(ConfigError, match="was built with the embedding model 'all-minilm-l6-v2'"):
        Index.open(built.store.directory, other)


def test_bad_queries_and_options(built, encoder, tmp_path):
    with pytest.raises(DataError, match="the query is 30[0-9] tokens; the encoder reads at most 254"):
        built.search("word " * 300)
    with pytest.raises(DataError, match="empty"):
        built.search("   ")
    with pytest.raises(ConfigError, match="unknown search mode"):
        built.search("x", mode="fuzzy")
    with pytest.raises(ConfigError, match="would be truncated"):
        built.add([Document("z", "text")], size=1000)
    with pytest.raises(ConfigError, match="already holds an index"):
        ChunkStore.create(built.store.directory, encoder_name="e", fingerprint=[], dim=384)
    with pytest.raises(ConfigError, match="vectors"):
        built.store.add([], torch.zeros(1, 384))


def test_ivf_lists_are_trained_once_and_kept_across_opens_and_updates(built, encoder, monkeypatch):
    from lmstack.rag import retrieve

    directory = built.store.directory
    first = Index.open(directory, encoder, kind="ivf", n_lists=4, n_probe=4)  # all lists probed: exact results
    saved = directory / retrieve.IVF_FILE
    assert saved.is_file() and first.dense_index.n_lists == 4
    expected = [(h.chunk.id, round(h.score, 5)) for h in built.search("quantization", k=3)]
    assert [(h.chunk.id, round(h.score, 5)) for h in first.search("quantization", k=3)] == expected

    def no_training(*args, **kwargs):
        raise AssertionError("the saved IVF lists should have been reused")

    monkeypatch.setattr(retrieve, "train_centroids", no_training)
    again = Index.open(directory, encoder, kind="ivf", n_lists=4, n_probe=4)
    assert torch.equal(again.dense_index.centroids, first.dense_index.centroids)
    again.add([Document("new.txt", "Sourdough needs a starter fed with flour and water.")], size=32, overlap=8)
    assert again.search("sourdough starter", k=1)[0].chunk.doc_id == "new.txt"  # added rows go to the lists
    monkeypatch.undo()
    other = Index.open(directory, encoder, kind="ivf", n_lists=2, n_probe=2)  # another size: trained again
    assert other.dense_index.n_lists == 2 and len(retrieve.load_file(saved)["centroids"]) == 2


def test_a_damaged_ivf_file_is_named(built, encoder):
    from lmstack.rag import retrieve

    (built.store.directory / retrieve.IVF_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="ivf-centroids.safetensors is unreadable.*delete it"):
        Index.open(built.store.directory, encoder, kind="ivf")
