"""Quality baseline for the quickstart: a character-level nanoGPT trained for the same wall-clock time.

nanoGPT's documented CPU recipe for Shakespeare (4 layers, 4 heads, width 128, block 64, batch 12, lr 1e-3
decaying to 1e-4, beta2 0.99, no dropout) on the corpus and held-out plays of the quickstart (lmstack's
document split, same seed), trained for --seconds of training loop (default: the training time of the
quickstart run in --run, read from its metrics.jsonl), its cosine schedule running on the clock. Prints
held-out bits per byte next to the quickstart's.

    python benchmarks/pretrain_quality.py [--run runs/quickstart] [--seconds S]
"""

import argparse
import math
import time
from pathlib import Path

import nanogpt_reference as nanogpt
import torch
import torch.nn.functional as F
from table import print_table

from lmstack.data import read_documents, resolve_sources, split_documents
from lmstack.train.trainer import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="the quickstart's run directory")
    parser.add_argument("--seconds", type=float, help="training seconds (default: the run's)")
    parser.add_argument("--sources", nargs="+", default=["shakespeare"])
    parser.add_argument("--held-out", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    ours = _run_summary(args.run)
    seconds = args.seconds if args.seconds is not None else ours.get("train_seconds", 600.0)

    train_docs, held_docs = split_documents(read_documents(resolve_sources(args.sources)), args.held_out, args.seed)
    train_text = "\n".join(d.text for d in train_docs)
    held_text = "\n".join(d.text for d in held_docs)
    chars = sorted(set(train_text) | set(held_text))
    index = {c: i for i, c in enumerate(chars)}
    train = torch.tensor([index[c] for c in train_text])
    held = torch.tensor([index[c] for c in held_text])
    char_bytes = torch.tensor([len(c.encode("utf-8")) for c in chars])

    torch.manual_seed(args.seed)
    block, batch = 64, 12
    model = nanogpt.NanoGPT(len(chars), block, n_layer=4, n_head=4, n_embd=128)
    optimizer = nanogpt.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    g = torch.Generator().manual_seed(args.seed)

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - block - 1, (batch,), generator=g)
        x = torch.stack([train[s:s + block] for s in starts])
        y = torch.stack([train[s + 1:s + block + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    # The schedule runs on the clock: warmup over the first 100 iterations, then cosine from 1e-3 to 1e-4
    # over the time budget, so the model gets exactly --seconds of training whatever its speed.
    start, it = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        progress = min(1.0, elapsed / seconds)
        lr = 1e-3 * (it + 1) / 100 if it < 100 else 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * progress))
        step(lr)
        it += 1
    trained = time.perf_counter() - start
    bpb, nats_per_char = _held_out(model, held, char_bytes, block)
    print(f"character-level nanoGPT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(chars)} characters), {it} iterations in {trained:.0f} s of training")
    header = ("model", "training s", "held-out bits/byte")
    rows = [("nanoGPT char-level (4x128, block 64)", f"{trained:.0f}", f"{bpb:.3f}")]
    if ours:
        rows.append((f"lmstack quickstart ({args.run})", f"{ours['train_seconds']:.0f}", f"{ours['bpb']:.3f}"))
    print_table(header, rows)
    print(f"(char-level held-out loss {nats_per_char:.3f} nats/char)")


@torch.no_grad()
def _held_out(model, held: torch.Tensor, char_bytes: torch.Tensor, block: int) -> tuple[float, float]:
    """Bits per byte over every non-overlapping window of the held-out text."""
    model.eval()
    nats, n_bytes, n_chars = 0.0, 0, 0
    windows = torch.stack([held[s:s + block + 1] for s in range(0, len(held) - block - 1, block)])
    for chunk in windows.split(64):
        x, y = chunk[:, :-1], chunk[:, 1:]
        nats += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"))
        n_bytes += int(char_bytes[y].sum())
        n_chars += y.numel()
    return nats / math.log(2) / n_bytes, nats / n_chars


def _run_summary(run: Path) -> dict:
    """Training seconds and final held-out bits/byte of a quickstart run, or {} if there is none."""
    records = read_metrics(run / "metrics.jsonl")
    if not records:
        return {}
    bpb = next((r["eval_bpb"] for r in reversed(records) if "eval_bpb" in r), float("nan"))
    return {"train_seconds": records[-1]["elapsed_s"], "bpb": bpb}


if __name__ == "__main__":
    main()
