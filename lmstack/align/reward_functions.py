"""Verifiable reward functions for GRPO / PPO, and how a run names them.

A reward function is ``fn(prompts, completions, **row_fields) -> list[float]`` (``lmstack.align.rollouts``).
On the command line ``--reward.functions`` lists built-in names (below) or ``module:function`` /
``path/to/file.py:function`` for your own.
"""

import importlib
import importlib.util
import re
from pathlib import Path

from lmstack.align.rollouts import RewardFunction
from lmstack.errors import ConfigError

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER_LINE = re.compile(r"^\s*answer:\s*-?\d+(?:\.\d+)?\s*$", re.IGNORECASE | re.MULTILINE)


def exact_answer(completions: list[str], answer: list, **_) -> list[float]:
    """1.0 where the last number in the completion equals the row's ``answer``, else 0.0."""
    out = []
    for text, expected in zip(completions, answer):
        numbers = _NUMBER.findall(text.replace(",", ""))
        out.append(1.0 if numbers and float(numbers[-1]) == float(expected) else 0.0)
    return out


def answer_line(completions: list[str], **_) -> list[float]:
    """Format check: 1.0 where the completion has a line ``Answer: <number>``, else 0.0."""
    return [1.0 if _ANSWER_LINE.search(text) else 0.0 for text in completions]


def short(completions: list[str], **_) -> list[float]:
    """Brevity: 1 / (1 + words / 20), so a terse answer scores near 1 and a ramble near 0."""
    return [1.0 / (1.0 + len(text.split()) / 20) for text in completions]


BUILTIN: dict[str, RewardFunction] = {"exact_answer": exact_answer, "answer_line": answer_line, "short": short}


def load_reward_function(spec: str) -> RewardFunction:
    """A built-in name, ``package.module:function`` or ``path/to/file.py:function``.

    Raises:
        ConfigError: an unknown name, a module or file that does not import, or no such callable in it.
    """
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ConfigError(f"unknown reward function {spec!r}: built-in ones are {', '.join(BUILTIN)}, or give "
                          "module:function / file.py:function")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"reward function {spec!r}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(f"lmstack_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as error:  # the user's module: its import failure is reported, not a traceback from here
        raise ConfigError(f"reward function {spec!r}: importing {where} failed: {type(error).__name__}: {error}"
                          ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {where} has no function {name!r}")
    return fn
