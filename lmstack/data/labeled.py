"""Labelled examples for fine-tuning: CSV / JSONL rows -> token ids + label ids -> padded batches.

Sequence (pair) classification reads a text column (and optionally a second one) and a label column.
Token classification (NER) reads JSONL rows with a list of words and a list of BIO tags; each word is
split into word pieces and only its first piece carries the label (the rest are IGNORE_INDEX), as in
BERT's NER recipe. Sequences longer than ``max_length`` are an error unless truncation is asked for,
and then the number of truncated rows is reported. Shapes: B rows, T longest row of the batch.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.data.collate import IGNORE_INDEX
from lmstack.errors import DataError


def read_rows(path: str | Path, columns: list[str]) -> list[dict]:
    """Rows of a .csv (with a header) or .jsonl file; every row must hold ``columns``.

    Raises:
        DataError: a missing file, an unknown format, bad JSON, or a row lacking a column (named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        rows = _read(path, columns)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    for n, row in enumerate(rows, 1):
        empty = [c for c in columns if row.get(c) is None or row.get(c) == ""]
        if empty:  # a missing cell would otherwise become the text (or class) "None"
            raise DataError(f"{path}: row {n} has no value for {empty[0]!r}")
    return rows


def _read(path: Path, columns: list[str]) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: no column {missing[0]!r}; the header has {reader.fieldnames}")
            rows = list(reader)
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{n}: not valid JSON ({error})") from None
            missing = [c for c in columns if c not in rows[-1]]
            if missing:
                raise DataError(f"{path}:{n}: no field {missing[0]!r} (the row has {sorted(rows[-1])})")
    else:
        raise DataError(f"{path}: expected a .csv or .jsonl file")
    return rows


def label_set(values: list[str], outside_first: bool = False) -> tuple[str, ...]:
    """Sorted distinct labels ("O" first for BIO tags)."""
    labels = sorted(set(values))
    if outside_first and "O" in labels:
        labels.remove("O")
        labels.insert(0, "O")
    return tuple(labels)


def label_ids(values: list[str], labels: tuple[str, ...], where: str) -> list[int]:
    """Map label names to ids; a name outside ``labels`` is a DataError naming it and ``where``."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(v) for v in values if str(v) not in index})
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not in the label set {list(labels)}")
    return [index[str(v)] for v in values]


@dataclass
class EncodedExamples:
    """Token ids, segment ids and labels of a dataset (labels per row, or per token with IGNORE_INDEX)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list  # list[int] (sequence) or list[list[int]] (token)
    truncated: int = 0


def encode_sequences(tokenizer, texts: list[str], pairs: list[str] | None, labels: list[int], max_length: int,
                     truncate: bool, where: str) -> EncodedExamples:
    """[CLS] text [SEP] (text_pair [SEP]) per row, checked against ``max_length``."""
    out = EncodedExamples([], [], labels)
    for i, text in enumerate(texts):
        pair = pairs[i] if pairs is not None else None
        full = tokenizer(text, pair)
        if len(full["input_ids"]) > max_length:
            if not truncate:
                raise DataError(f"{where}: row {i + 1} has {len(full['input_ids'])} tokens, more than "
                                f"max_length={max_length}; set data.truncate true to cut long rows")
            full = tokenizer(text, pair, truncation=True, max_length=max_length)
            out.truncated += 1
        out.input_ids.append(full["input_ids"])
        out.token_type_ids.append(full["token_type_ids"])
    return out


def encode_tagged(tokenizer, words: list[list[str]], tags: list[list[int]], max_length: int, truncate: bool,
                  where: str) -> EncodedExamples:
    """[CLS] pieces [SEP] per sentence; each word's first piece carries its tag, the rest IGNORE_INDEX."""
    cls_id, sep_id = tokenizer.vocab[tokenizer.cls_token], tokenizer.vocab[tokenizer.sep_token]
    out = EncodedExamples([], [], [])
    for i, (sentence, sentence_tags) in enumerate(zip(words, tags)):
        if len(sentence) != len(sentence_tags):
            raise DataError(f"{where}: row {i + 1} has {len(sentence)} words but {len(sentence_tags)} tags")
        ids, labels = [cls_id], [IGNORE_INDEX]
        for word, tag in zip(sentence, sentence_tags):
            pieces = tokenizer.encode(word, add_special_tokens=False) or [tokenizer.vocab[tokenizer.unk_token]]
            ids += pieces
            labels += [tag] + [IGNORE_INDEX] * (len(pieces) - 1)
        if len(ids) + 1 > max_length:
            if not truncate:
                raise DataError(f"{where}: row {i + 1} has {len(ids) + 1} tokens, more than max_length="
                                f"{max_length}; set data.truncate true to cut long rows (words cut off are "
                                "then not scored)")
            ids, labels = ids[:max_length - 1], labels[:max_length - 1]
            out.truncated += 1
        out.input_ids.append(ids + [sep_id])
        out.labels.append(labels + [IGNORE_INDEX])
        out.token_type_ids.append([0] * (len(ids) + 1))
    return out


def pad_batch(examples: EncodedExamples, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows ``rows`` right-padded to the longest: input_ids, token_type_ids, attention_mask, labels."""
    T = max(len(examples.input_ids[r]) for r in rows)

    def padded(seqs, value):
        return torch.tensor([seq + [value] * (T - len(seq)) for seq in seqs])

    batch = {"input_ids": padded([examples.input_ids[r] for r in rows], pad_id),
             "token_type_ids": padded([examples.token_type_ids[r] for r in rows], 0),
             "attention_mask": padded([[1] * len(examples.input_ids[r]) for r in rows], 0)}
    first = examples.labels[rows[0]]
    if isinstance(first, list):
        batch["labels"] = padded([examples.labels[r] for r in rows], IGNORE_INDEX)
    else:
        batch["labels"] = torch.tensor([examples.labels[r] for r in rows])
    return batch


class ShuffledBatches:
    """Endless shuffled batches over ``n_items`` items (examples, packed rows, pairs): ``collate(indices)``
    builds a batch. The order is a function of (seed, epoch), so the state is (epoch, cursor) and resuming
    continues the exact sequence."""

    def __init__(self, n_items: int, batch_size: int, seed: int, collate) -> None:
        if not n_items:
            raise DataError("no training examples")
        self.n_items, self.batch_size, self.seed, self.collate = n_items, batch_size, seed, collate
        self.epoch, self.cursor = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_items, generator=g).tolist()

    def next_batch(self):
        rows = []
        while len(rows) < self.batch_size:
            order = self._order()
            take = order[self.cursor:self.cursor + self.batch_size - len(rows)]
            rows += take
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return self.collate(rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise DataError(f"resumed data order has seed {state.get('seed')}, this run {self.seed}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


class ExampleBatches(ShuffledBatches):
    """Endless shuffled, padded batches of labelled examples (``ShuffledBatches`` over ``pad_batch``)."""

    def __init__(self, examples: EncodedExamples, batch_size: int, seed: int, pad_id: int) -> None:
        super().__init__(len(examples.input_ids), batch_size, seed, lambda rows: pad_batch(examples, rows, pad_id))
        self.examples, self.pad_id = examples, pad_id


def eval_example_batches(examples: EncodedExamples, batch_size: int, pad_id: int):
    """All examples in order, in batches (the same every time)."""
    n = len(examples.input_ids)
    for start in range(0, n, batch_size):
        yield pad_batch(examples, list(range(start, min(n, start + batch_size))), pad_id)
