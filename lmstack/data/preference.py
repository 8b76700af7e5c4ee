"""Preference data: (prompt, chosen, rejected) pairs for DPO-style losses and reward models, and unpaired
(prompt, completion, label) rows for KTO -> token ids -> batches.

A prompt and a completion are strings (the completion gets EOS appended) or message lists (rendered with
the chat template: the prompt with the assistant header, prompt + completion in full). As trl does, the
completion starts where the tokenised prompt and the tokenised prompt + completion first differ, so a
token merging across the boundary never splits. A pair batch is (2B, T): the B chosen rows, then the B
rejected rows, right-padded, with ``completion_mask`` over the completion tokens.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.data.labeled import ShuffledBatches, read_rows
from lmstack.data.sft import Encoded
from lmstack.errors import DataError
from lmstack.tokenizers import TokenizerError, render_chat


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float | None = None


@dataclass
class UnpairedCompletion:
    prompt: list[int]
    completion: list[int]
    desirable: bool


def read_preference_rows(path: str | Path, unpaired: bool = False) -> list[dict]:
    """Rows of a JSONL file: prompt/chosen/rejected (optional margin), or prompt/completion/label (KTO)."""
    columns = ["prompt", "completion", "label"] if unpaired else ["prompt", "chosen", "rejected"]
    return read_rows(path, columns)


def _texts(tokenizer, template: str | None, eos_id: int, prompt, completions: list, variables: dict):
    """Token ids of the prompt and of prompt + each completion."""
    if isinstance(prompt, list):  # conversational
        for c in completions:
            if not isinstance(c, list):
                raise DataError("a conversational prompt needs completions that are message lists too")
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        prompt_ids = encode(render_chat(prompt, template, add_generation_prompt=True, **variables))
        return prompt_ids, [encode(render_chat(prompt + c, template, **variables)) for c in completions]
    if not isinstance(prompt, str) or not all(isinstance(c, str) and c for c in completions):
        raise DataError("prompts and completions must be strings (completions non-empty) or message lists")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    return prompt_ids, [tokenizer.encode(prompt + c, add_special_tokens=False) + [eos_id] for c in completions]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pairs(rows: list[dict], tokenizer, template: str | None, eos_id: int, max_length: int,
                 **variables) -> Encoded:
    """PreferencePairs of ``rows``; pairs whose chosen equals rejected, or longer than ``max_length``, are
    skipped and counted (DataError if none is left, or a row is malformed)."""
    pairs, skipped = [], {"chosen == rejected": 0, "longer than max_length": 0}
    for n, row in enumerate(rows, 1):
        if row["chosen"] == row["rejected"]:
            skipped["chosen == rejected"] += 1
            continue
        try:
            prompt, (chosen, rejected) = _texts(tokenizer, template, eos_id, row["prompt"],
                                                [row["chosen"], row["rejected"]], variables)
        except (TokenizerError, DataError) as error:
            raise DataError(f"row {n}: {error}") from None
        cut = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        if max(len(chosen), len(rejected)) > max_length:
            skipped["longer than max_length"] += 1
            continue
        margin = row.get("margin")
        pairs.append(PreferencePair(prompt[:cut], chosen[cut:], rejected[cut:],
                                    None if margin is None else float(margin)))
    if not pairs:
        raise DataError("no usable preference pair (" + ", ".join(f"{v} {k}" for k, v in skipped.items()) + ")")
    return Encoded(pairs, skipped)


def encode_unpaired(rows: list[dict], tokenizer, template: str | None, eos_id: int, max_length: int,
                    **variables) -> Encoded:
    """UnpairedCompletions of KTO rows (``label`` true = desirable); too-long rows are skipped and counted."""
    out, skipped = [], {"longer than max_length": 0}
    for n, row in enumerate(rows, 1):
        if not isinstance(row["label"], bool):
            raise DataError(f"row {n}: 'label' must be true or false, got {row['label']!r}")
        try:
            prompt, (full,) = _texts(tokenizer, template, eos_id, row["prompt"], [row["completion"]], variables)
        except (TokenizerError, DataError) as error:
            raise DataError(f"row {n}: {error}") from None
        if len(full) > max_length:
            skipped["longer than max_length"] += 1
            continue
        cut = _common_prefix(prompt, full)
        out.append(UnpairedCompletion(prompt[:cut], full[cut:], row["label"]))
    if not out:
        raise DataError(f"no KTO row fits in max_length={max_length}")
    return Encoded(out, skipped)


def pad_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / completion_mask (N, T) of prompt + completion rows, right-padded."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    completion = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        attention[r, :len(p) + len(c)] = 1
        completion[r, len(p):len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def collate_pairs(pairs: list[PreferencePair], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The (2B, T) batch of ``pairs[indices]``: chosen rows, then rejected rows (+ ``margin`` (B,) if set)."""
    picked = [pairs[i] for i in indices]
    prompts = [p.prompt for p in picked] * 2
    batch = pad_rows(prompts, [p.chosen for p in picked] + [p.rejected for p in picked], pad_id)
    if all(p.margin is not None for p in picked):
        batch["margin"] = torch.tensor([p.margin for p in picked])
    return batch


def collate_unpaired(rows: list[UnpairedCompletion], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A KTO batch: the rows, their ``label``s, and ``KL_*`` rows pairing each prompt with the previous row's
    completion (the first with the last's; trl's mismatched pairs for the reference point)."""
    picked = [rows[i] for i in indices]
    batch = pad_rows([r.prompt for r in picked], [r.completion for r in picked], pad_id)
    shifted = [picked[-1].completion] + [r.completion for r in picked[:-1]]
    batch.update({f"KL_{k}": v for k, v in pad_rows([r.prompt for r in picked], shifted, pad_id).items()})
    batch["label"] = torch.tensor([r.desirable for r in picked])
    return batch


class PairBatches(ShuffledBatches):
    """Endless shuffled preference batches (pairs, or KTO rows with ``unpaired``)."""

    def __init__(self, items: list, batch_size: int, seed: int, pad_id: int, unpaired: bool = False) -> None:
        collate = collate_unpaired if unpaired else collate_pairs
        super().__init__(len(items), batch_size, seed, lambda picked: collate(items, picked, pad_id))


def eval_pair_batches(items: list, batch_size: int, pad_id: int, unpaired: bool = False):
    """Every pair (or KTO row) once, in order."""
    collate = collate_unpaired if unpaired else collate_pairs
    for start in range(0, len(items), batch_size):
        yield collate(items, list(range(start, min(len(items), start + batch_size))), pad_id)
