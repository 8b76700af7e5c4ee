"""Prompt data for the RL trainers (GRPO, PPO): JSONL rows with a ``prompt`` (a string, used as it is, or
a message list, rendered with the chat template and its assistant header, as trl does) and any other
fields the reward functions read (``answer``, ...)."""

from dataclasses import dataclass
from pathlib import Path

from lmstack.data.labeled import read_rows
from lmstack.data.sft import Encoded
from lmstack.errors import DataError
from lmstack.tokenizers import TokenizerError, render_chat


@dataclass
class PromptExample:
    ids: list[int]  # the prompt's tokens, generation continues after them
    text: str  # what reward functions see as the prompt
    row: dict  # the dataset row (its other fields reach the reward functions)


def read_prompt_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL (or CSV) file, each with a ``prompt``."""
    return read_rows(path, ["prompt"])


def encode_prompts(rows: list[dict], tokenizer, template: str | None, max_length: int, **variables) -> Encoded:
    """PromptExamples of ``rows``; prompts longer than ``max_length`` tokens are skipped and counted.

    Raises:
        DataError: a prompt that is neither a string nor a message list (the row named), or none left.
    """
    examples, skipped = [], {"longer than max_prompt_length": 0}
    for n, row in enumerate(rows, 1):
        prompt = row["prompt"]
        try:
            if isinstance(prompt, list):
                text = render_chat(prompt, template, add_generation_prompt=True, **variables)
            elif isinstance(prompt, str):
                text = prompt
            else:
                raise DataError(f"prompt must be a string or a message list, not {type(prompt).__name__}")
        except (TokenizerError, DataError) as error:
            raise DataError(f"row {n}: {error}") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise DataError(f"row {n}: the prompt has no tokens")
        if len(ids) > max_length:
            skipped["longer than max_prompt_length"] += 1
            continue
        examples.append(PromptExample(ids, text, row))
    if not examples:
        raise DataError(f"no prompt fits in max_prompt_length={max_length} tokens ({skipped})")
    return Encoded(examples, skipped)
