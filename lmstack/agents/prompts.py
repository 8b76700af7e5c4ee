"""Prompting techniques: templates with checked variables, few-shot example selection, chain of thought,
self-consistency and answer extraction.

    template = PromptTemplate("Q: {question}\\nA:")
    template.format(question="2 + 2?")                       # a missing or unknown variable is an error
    shots = NearestExamples(examples, encoder, n=3).select("How many apples ...?")
    prompt = few_shot_prompt(template, shots, {"question": q}, answer_key="answer")
    chain_of_thought(prompt)                                 # + "Let's think step by step."
    vote = self_consistency(lambda seed: complete(prompt, seed), n=5)   # majority of the extracted answers
"""

import random
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import regex
import torch

from lmstack.errors import ConfigError

COT_TRIGGER = "Let's think step by step."
_NUMBER = regex.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = regex.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:|####)\s*:?\s*([^\n]+)", regex.IGNORECASE)


class PromptTemplate:
    """Text with ``{name}`` variables (``{{`` / ``}}`` for literal braces). ``format`` requires exactly the
    template's variables: a missing one or an unknown one is a ConfigError naming it."""

    def __init__(self, text: str) -> None:
        try:
            fields = [f for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
        except ValueError as error:
            raise ConfigError(f"bad prompt template ({error}); write literal braces as {{{{ and }}}}") from None
        for name in fields:
            if not name.isidentifier():
                raise ConfigError(f"prompt template variable {{{name}}} must be a plain name")
        self.text, self.variables = text, tuple(dict.fromkeys(fields))

    def format(self, **values) -> str:
        missing = [v for v in self.variables if v not in values]
        unknown = [v for v in values if v not in self.variables]
        if missing:
            raise ConfigError(f"prompt template needs {', '.join(missing)} (it takes {', '.join(self.variables)})")
        if unknown:
            raise ConfigError(f"prompt template has no variable {', '.join(unknown)} (it takes "
                              f"{', '.join(self.variables) or 'none'})")
        return self.text.format(**{k: str(v) for k, v in values.items()})


class FixedExamples:
    """The first ``n`` examples, always."""

    def __init__(self, examples: list[dict], n: int | None = None) -> None:
        self.examples = examples[:n] if n is not None else list(examples)

    def select(self, query: str) -> list[dict]:
        return list(self.examples)


class RandomExamples:
    """``n`` examples drawn at random for each query (seeded: the same sequence of selections every run)."""

    def __init__(self, examples: list[dict], n: int, seed: int = 0) -> None:
        if n > len(examples):
            raise ConfigError(f"cannot draw {n} examples from {len(examples)}")
        self.examples, self.n, self.random = examples, n, random.Random(seed)

    def select(self, query: str) -> list[dict]:
        return self.random.sample(self.examples, self.n)


class NearestExamples:
    """The ``n`` examples whose ``key`` text is most similar to the query (cosine of sentence embeddings),
    most similar last so that it sits next to the query."""

    def __init__(self, examples: list[dict], encoder, n: int, key: str = "question") -> None:
        if n > len(examples):
            raise ConfigError(f"cannot select {n} examples from {len(examples)}")
        if any(key not in e for e in examples):
            raise ConfigError(f"every example needs a {key!r} field to be selected by similarity")
        self.examples, self.encoder, self.n = examples, encoder, n
        self.vectors = torch.nn.functional.normalize(encoder.encode([e[key] for e in examples]), dim=1)

    def select(self, query: str) -> list[dict]:
        q = torch.nn.functional.normalize(self.encoder.encode([query]), dim=1)[0]
        best = (self.vectors @ q).topk(self.n).indices.tolist()
        return [self.examples[i] for i in reversed(best)]


def few_shot_prompt(template: PromptTemplate, examples: list[dict], query: dict, answer_key: str = "answer",
                    separator: str = "\n\n") -> str:
    """Each example rendered by ``template`` followed by its ``answer_key``, then the query rendered (its
    answer left for the model)."""
    shots = []
    for example in examples:
        values = {k: v for k, v in example.items() if k in template.variables}
        if answer_key not in example:
            raise ConfigError(f"few-shot example {example!r} has no {answer_key!r}")
        shots.append(f"{template.format(**values)} {example[answer_key]}")
    return separator.join([*shots, template.format(**query)])


def chain_of_thought(prompt: str, trigger: str = COT_TRIGGER) -> str:
    """Zero-shot chain of thought (Kojima et al., 2022): the prompt, then the reasoning trigger."""
    return f"{prompt} {trigger}"


def extract_answer(text: str, numeric: bool = True) -> str | None:
    """The answer a completion states: after "the answer is" / "Answer:" / "####" if present, else (numeric)
    the last number in the text. Numbers are normalised ("1,000" -> "1000", "4.0" -> "4"); None if none."""
    stated = _ANSWER_IS.findall(text)
    if stated:
        text = stated[-1]
        if not numeric:
            return text.strip().rstrip(".").strip() or None
    if not numeric:
        return text.strip() or None
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[0 if stated else -1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


@dataclass(frozen=True)
class Vote:
    answer: str | None
    votes: Counter
    completions: list[str]


def self_consistency(sample: Callable[[int], str], n: int = 5, extract: Callable[[str], str | None] = extract_answer
                     ) -> Vote:
    """Self-consistency (Wang et al., 2022): ``sample(i)`` gives the i-th sampled reasoning path; the answer is
    the most frequent extracted answer (paths without one do not vote; a tie goes to the answer reached first)."""
    if n < 1:
        raise ConfigError(f"self-consistency needs n >= 1 samples, got {n}")
    completions = [sample(i) for i in range(n)]
    answers = [a for a in map(extract, completions) if a is not None]
    votes = Counter(answers)
    if not votes:
        return Vote(None, votes, completions)
    top = max(votes.values())
    return Vote(next(a for a in answers if votes[a] == top), votes, completions)
