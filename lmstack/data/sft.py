"""SFT data: chat conversations or prompt/completion pairs -> token ids with a loss mask -> batches.

Rows (JSONL) are either ``{"messages": [{"role", "content"}, ...]}`` (rendered with the model's chat
template; the loss covers the assistant tokens the template marks, ``lmstack.tokenizers.encode_chat``) or
``{"prompt": ..., "completion": ...}`` (strings: prompt + completion + EOS, the loss on the completion and
EOS, as trl; or message lists: the completion's assistant turns).

Packing puts several examples into one row of at most ``max_length`` tokens (best-fit decreasing). The
row's attention mask numbers its examples 1, 2, 3, ... (segment ids: each attends only within itself,
``lmstack.nn.masks``) and positions restart at 0 for each, so a packed batch computes exactly what the
same examples padded one per row compute (tested), without the padding.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.data.collate import IGNORE_INDEX
from lmstack.data.labeled import ShuffledBatches, read_rows
from lmstack.errors import DataError
from lmstack.tokenizers import TokenizerError, encode_chat


@dataclass
class SFTExample:
    """ids: the example's tokens; mask: 1 where the token is trained on (predicted from the ones before)."""

    ids: list[int]
    mask: list[int]


@dataclass
class Encoded:
    """The examples that fit, and how many rows were skipped for which reason."""

    examples: list[SFTExample]
    skipped: dict[str, int]

    def report(self) -> str:
        kept = f"{len(self.examples):,} examples"
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n)
        return kept + (f" (skipped: {dropped})" if dropped else "")


def read_sft_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file of conversations or prompt/completion pairs (DataError names a bad row)."""
    rows = read_rows(path, [])
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not ("messages" in row or ("prompt" in row and "completion" in row)):
            raise DataError(f"{path}: row {n} needs 'messages', or 'prompt' and 'completion'")
    return rows


def encode_sft(rows: list[dict], tokenizer, template: str | None, eos_id: int, max_length: int,
               **variables) -> Encoded:
    """Token ids and loss masks of ``rows``; rows longer than ``max_length`` are skipped and counted.

    Raises:
        DataError: a conversation without an assistant turn, a template that marks no assistant tokens
            (no mask possible), malformed messages, or no row that fits.
    """
    examples, skipped = [], {"longer than max_length": 0}
    for n, row in enumerate(rows, 1):
        try:
            example = _encode_row(row, tokenizer, template, eos_id, variables)
        except (TokenizerError, DataError) as error:
            raise DataError(f"row {n}: {error}") from None
        if len(example.ids) > max_length:
            skipped["longer than max_length"] += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"no example fits in max_length={max_length} tokens ({skipped['longer than max_length']} "
                        "longer)")
    return Encoded(examples, skipped)


def _encode_row(row: dict, tokenizer, template: str | None, eos_id: int, variables: dict) -> SFTExample:
    if "messages" in row:
        return _encode_messages(row["messages"], tokenizer, template, variables)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt / completion
        encoded = _encode_messages(prompt + completion, tokenizer, template, variables)
        prompt_length = len(encode_chat(tokenizer, prompt, template, add_generation_prompt=True, **variables).ids)
        return SFTExample(encoded.ids, [0] * prompt_length + encoded.mask[prompt_length:])
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataError("'prompt' and 'completion' must both be strings (the completion non-empty) or message lists")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(prompt + completion, add_special_tokens=False) + [eos_id]
    return SFTExample(ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids)))


def _encode_messages(messages, tokenizer, template: str | None, variables: dict) -> SFTExample:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {'role', 'content'} objects")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise DataError("the conversation has no assistant turn (nothing to train on)")
    encoded = encode_chat(tokenizer, messages, template, **variables)
    if not any(encoded.assistant_mask):
        raise DataError("the chat template marks no assistant tokens, so no loss mask is possible (give it "
                        "{% generation %} markers or render assistant content verbatim)")
    return SFTExample(encoded.ids, encoded.assistant_mask)


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most ``max_length`` tokens, longest
    first, each into the fullest row it still fits. Deterministic (ties keep the input order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(i)
            room[best] -= lengths[i]
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


def collate_sft(examples: list[SFTExample], rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of rows, each the concatenation of the listed examples, right-padded to the longest row.

    Returns input_ids, attention_mask (0 padding, k for the k-th example of the row), position_ids
    (restarting per example) and labels: next-token targets (B, T), IGNORE_INDEX where the next token is
    not trained on, is padding, or belongs to the next example.
    """
    width = max(sum(len(examples[i].ids) for i in row) for row in rows)
    shape = (len(rows), width)
    ids, segments = torch.full(shape, pad_id), torch.zeros(shape, dtype=torch.long)
    positions, labels = torch.zeros(shape, dtype=torch.long), torch.full(shape, IGNORE_INDEX)
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row, 1):
            example, n = examples[i], len(examples[i].ids)
            tokens = torch.tensor(example.ids)
            ids[r, start:start + n], segments[r, start:start + n] = tokens, k
            positions[r, start:start + n] = torch.arange(n)
            trained = torch.tensor(example.mask[1:], dtype=torch.bool)
            labels[r, start:start + n - 1] = tokens[1:].masked_fill(~trained, IGNORE_INDEX)
            start += n
    return {"input_ids": ids, "attention_mask": segments, "position_ids": positions, "labels": labels}


class SFTBatches(ShuffledBatches):
    """Endless shuffled SFT batches: one example per row, or packed rows with ``packing``."""

    def __init__(self, examples: list[SFTExample], batch_size: int, seed: int, pad_id: int, max_length: int,
                 packing: bool = False) -> None:
        self.rows = pack([len(e.ids) for e in examples], max_length) if packing else [[i] for i in range(len(examples))]
        super().__init__(len(self.rows), batch_size, seed,
                         lambda picked: collate_sft(examples, [self.rows[i] for i in picked], pad_id))


def eval_sft_batches(examples: list[SFTExample], batch_size: int, pad_id: int):
    """Every example once, in order, one per row (the same every time)."""
    for start in range(0, len(examples), batch_size):
        yield collate_sft(examples, [[i] for i in range(start, min(len(examples), start + batch_size))], pad_id)
