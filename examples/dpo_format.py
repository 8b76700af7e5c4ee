"""DPO teaches SmolLM2-135M-Instruct a checkable preference: answers that begin with "Answer:".

Preference pairs from chatterbot-corpus questions: the chosen reply is the corpus answer after "Answer: ",
the rejected one the same answer without it. `lmstack dpo` with LoRA (the reference is the model with its
adapters off), then the rate of greedy answers to unseen questions that follow the format, before and
after. About 5-10 minutes on 2 CPU cores.

    python examples/dpo_format.py [--steps 40] [--out runs/examples/dpo]
"""

import argparse
from pathlib import Path

from common import MODEL, answers, chatterbot_pairs, open_policy, table, write_jsonl

from lmstack.cli import main as lmstack
from lmstack.train.trainer import read_metrics

ASK = "{q} (Begin your reply with 'Answer:'.)"


def follows(text: str) -> bool:
    return text.strip().lower().startswith("answer:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/dpo"), help="run directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = chatterbot_pairs()
    held, train = pairs[:40], pairs[40:]
    row = lambda q, a: {"prompt": [{"role": "user", "content": ASK.format(q=q)}],  # noqa: E731
                        "chosen": [{"role": "assistant", "content": f"Answer: {a}"}],
                        "rejected": [{"role": "assistant", "content": a}]}
    train_file = write_jsonl(args.out / "train.jsonl", [row(q, a) for q, a in train])
    eval_file = write_jsonl(args.out / "eval.jsonl", [row(q, a) for q, a in held[:16]])
    questions = [ASK.format(q=q) for q, _ in held]
    before = answers(open_policy(), questions, max_new_tokens=16)
    run = args.out / "run"
    lmstack(["dpo", "--model.path", MODEL, "--data.train", str(train_file), "--data.eval", str(eval_file),
             "--data.max_length", "160", "--loss", "sigmoid", "--beta", "0.1", "--peft.method", "lora",
             "--peft.rank", "16", "--train.batch_size", "4", "--train.lr", "2e-4", "--train.min_lr", "2e-5",
             "--train.warmup_steps", "4", "--train.max_steps", str(args.steps), "--train.eval_every", "20",
             "--train.checkpoint_every", "1000", "--out", str(run)])
    final = read_metrics(run / "metrics.jsonl")[-1]
    after = answers(open_policy(run / "model"), questions, max_new_tokens=16)
    rate = lambda texts: sum(map(follows, texts)) / len(texts)  # noqa: E731
    print(f"\nheld-out pairs: reward accuracy {final.get('eval_reward_accuracy', float('nan')):.2f}, "
          f"margin {final.get('eval_reward_margin', float('nan')):.2f}")
    repeats = lambda texts: sum(t.lower().count("answer:") > 1 for t in texts) / len(texts)  # noqa: E731
    table(("", "before", "after"), [(f"answers starting 'Answer:' ({len(held)} unseen questions)",
                                     f"{rate(before):.0%}", f"{rate(after):.0%}"),
                                    ("answers repeating 'Answer:' (over-optimisation)", f"{repeats(before):.0%}",
                                     f"{repeats(after):.0%}")])
    table(("question", "before", "after"), [(q, b[:50], c[:50]) for (q, _), b, c in zip(held[:4], before, after)])


if __name__ == "__main__":
    main()
