"""SFT changes SmolLM2-135M-Instruct's answers to chatterbot-corpus questions it has not seen.

`lmstack sft` with LoRA on the corpus' question/answer conversations (assistant-only loss, packed), then the
held-out loss and answers before and after. About 5-10 minutes on 2 CPU cores.

    python examples/sft_chatterbot.py [--steps 60] [--out runs/examples/sft]
"""

import argparse
from pathlib import Path

from common import MODEL, answers, chatterbot_pairs, open_policy, table, write_jsonl

from lmstack.cli import main as lmstack
from lmstack.train.trainer import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/sft"), help="run directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = chatterbot_pairs()
    held, train = pairs[:24], pairs[24:]
    chat = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa
    train_file = write_jsonl(args.out / "train.jsonl", [chat(q, a) for q, a in train])
    eval_file = write_jsonl(args.out / "eval.jsonl", [chat(q, a) for q, a in held])
    questions = [q for q, _ in held[:4]]
    before = answers(open_policy(), questions)
    run = args.out / "run"
    common = ["--model.path", MODEL, "--data.train", str(train_file), "--data.eval", str(eval_file),
              "--data.max_length", "128", "--data.packing", "true", "--peft.method", "lora", "--peft.rank", "16",
              "--train.batch_size", "4", "--train.lr", "1e-3", "--train.min_lr", "1e-4", "--train.warmup_steps",
              "5", "--train.checkpoint_every", "1000", "--out"]
    # Step 0: the held-out loss of the untouched model (one step at a learning rate too small to move it).
    lmstack(["sft", *common, str(args.out / "before"), "--train.max_steps", "1", "--train.lr", "1e-12",
             "--train.min_lr", "0", "--train.warmup_steps", "0", "--train.progress", "false"])
    loss_before = read_metrics(args.out / "before" / "metrics.jsonl")[-1]["eval_loss"]
    lmstack(["sft", *common, str(run), "--train.max_steps", str(args.steps), "--train.eval_every", "20"])
    loss_after = read_metrics(run / "metrics.jsonl")[-1]["eval_loss"]
    after = answers(open_policy(run / "model"), questions)
    print(f"\nheld-out loss on {len(held)} unseen conversations (assistant tokens): "
          f"{loss_before:.3f} before -> {loss_after:.3f} after {args.steps} steps")
    table(("question", "corpus answer", "before", "after"),
          [(q, a[:60], b[:60], c[:60]) for (q, a), b, c in zip(held, before, after)])


if __name__ == "__main__":
    main()
