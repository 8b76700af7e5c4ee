"""What the alignment examples share: the bundled SmolLM2-135M-Instruct, its chat template, greedy answers
for a list of questions, the chatterbot-corpus question/answer pairs, and the before/after table."""

import glob
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from lmstack.align.rollouts import completion_texts, sample_completions  # noqa: E402
from lmstack.checkpoints import load_model  # noqa: E402
from lmstack.checkpoints.model_files import open_model  # noqa: E402
from lmstack.generate import GenerationConfig  # noqa: E402
from lmstack.recipes.bundled import resolve_model_dir  # noqa: E402
from lmstack.tokenizers import render_chat  # noqa: E402

MODEL = "smollm2-135m-instruct"


def open_policy(path=MODEL):
    """ModelFiles (model, tokenizer, chat template, stop ids) of ``path`` (the bundled SmolLM2 by default)."""
    return open_model(resolve_model_dir(path), load=load_model)


def prompt_ids(files, question: str) -> list[int]:
    text = render_chat([{"role": "user", "content": question}], files.chat_template.text, add_generation_prompt=True)
    return files.tokenizer.encode(text, add_special_tokens=False)


def answers(files, questions: list[str], max_new_tokens: int = 48, batch: int = 8) -> list[str]:
    """Greedy answers of ``files.model`` to ``questions`` (chat-formatted)."""
    pad = files.stop_ids[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=list(files.stop_ids), pad_token_id=pad)
    out = []
    for start in range(0, len(questions), batch):
        chunk = [prompt_ids(files, q) for q in questions[start:start + batch]]
        rollout = sample_completions(files.model.eval(), chunk, pad, config, do_sample=False)
        out += [t.strip() for t in completion_texts(files.tokenizer, rollout)]
    return out


def chatterbot_pairs() -> list[tuple[str, str]]:
    """(question, answer) pairs of chatterbot-corpus's English conversations, one per distinct question (the
    corpus repeats some; a held-out question must not also be a training one), in a fixed shuffled order."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        sys.exit("chatterbot-corpus is missing: pip install --no-deps chatterbot-corpus==1.3.3 (make setup does)")
    root = Path(spec.submodule_search_locations[0]) / "data" / "english"
    pairs = {}
    for path in sorted(glob.glob(str(root / "*.yml"))):
        for conversation in yaml.safe_load(Path(path).read_text(encoding="utf-8")).get("conversations", []):
            if len(conversation) >= 2 and all(isinstance(t, str) for t in conversation[:2]):
                pairs.setdefault(conversation[0].strip().lower(), (conversation[0].strip(), conversation[1].strip()))
    pairs = list(pairs.values())
    random.Random(0).shuffle(pairs)
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def table(header: tuple[str, ...], rows: list[tuple]) -> None:
    cells = [tuple(" ".join(str(c).split()) for c in row) for row in rows]  # one line per cell
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    for row in (header, *cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if row is header:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
