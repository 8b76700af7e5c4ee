"""GRPO with an exact-answer reward raises SmolLM2-135M-Instruct's accuracy on unseen arithmetic.

Generated addition and subtraction problems ("What is 7 + 5? Reply with just the number."), rewarded 1
when the last number of the completion is the answer (`exact_answer`); `lmstack grpo` with LoRA samples
groups of completions per problem and pushes up the ones that beat their group. Greedy accuracy on
held-out problems before and after. About 11 minutes on one CPU core.

    python examples/grpo_arithmetic.py [--steps 40] [--out runs/examples/grpo]
"""

import argparse
import random
from pathlib import Path

from common import MODEL, answers, open_policy, table, write_jsonl

from lmstack.align import exact_answer
from lmstack.cli import main as lmstack
from lmstack.train.trainer import read_metrics


def problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        op = rng.choice("+-")
        question = f"What is {a} {op} {b}? Reply with just the number."
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": a + b if op == "+" else a - b,
                     "question": question})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (one rollout each)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/grpo"), help="run directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, held = problems(400, seed=0), problems(60, seed=1)
    train_file = write_jsonl(args.out / "train.jsonl", train)
    eval_file = write_jsonl(args.out / "eval.jsonl", held[:16])
    questions, truth = [r["question"] for r in held], [r["answer"] for r in held]
    accuracy = lambda texts: sum(exact_answer(texts, truth)) / len(truth)  # noqa: E731
    before = answers(open_policy(), questions, max_new_tokens=12)
    run = args.out / "run"
    lmstack(["grpo", "--model.path", MODEL, "--data.train", str(train_file), "--data.eval", str(eval_file),
             "--reward.functions", "[exact_answer]", "--group-size", "6", "--sampling.max_new_tokens", "12",
             "--sampling.temperature", "0.8", "--peft.method", "lora", "--peft.rank", "16",
             "--train.batch_size", "3", "--train.lr", "5e-4", "--train.min_lr", "5e-5", "--train.warmup_steps",
             "2", "--train.max_steps", str(args.steps), "--train.eval_every", "10", "--train.checkpoint_every",
             "1000", "--out", str(run)])
    records = read_metrics(run / "metrics.jsonl")
    after = answers(open_policy(run / "model"), questions, max_new_tokens=12)
    first = sum(r["reward"] for r in records[:5]) / 5
    last = sum(r["reward"] for r in records[-5:]) / 5
    print(f"\nsampled reward (mean of the first / last 5 steps): {first:.2f} -> {last:.2f}")
    table(("", "before", "after"), [(f"greedy exact-answer accuracy ({len(held)} unseen problems)",
                                     f"{accuracy(before):.0%}", f"{accuracy(after):.0%}")])
    table(("problem", "answer", "before", "after"),
          [(q, t, b[:20], c[:20]) for q, t, b, c in list(zip(questions, truth, before, after))[:5]])


if __name__ == "__main__":
    main()
