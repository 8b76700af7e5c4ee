"""Training speed: lmstack vs transformers' GPT2LMHeadModel vs a plain nanoGPT-style model, same run.

One GPT shape (default: 6 layers, width 384, 6 heads, block 256, GPT-2's 50257-token vocabulary, no
dropout, fp32, CPU). Each model trains on the same random batches with the same AdamW (fused, decay on
matrices) for --steps optimizer steps after --warmup, with its own loss: transformers' ``labels=``,
nanoGPT's F.cross_entropy on the logits, lmstack's ``CausalLMObjective`` (the Trainer's: LM head and loss
fused, ``linear_cross_entropy``); a step is forward + loss + backward + clip +
optimizer step. Tokens/s is the median over steps. MFU = achieved model FLOP/s / the fp32 matmul peak
measured in the same run, with model FLOPs per token = 6 * (matmul parameters) + 12 * layers * block * width
(the PaLM accounting: weights forward and backward, plus attention scores).

    python benchmarks/train.py [--steps 6] [--n-layer 6 --n-embd 384 --n-head 6 --block 256 --batch 8]
"""

import argparse
import statistics
import tempfile
import time

import nanogpt_reference as nanogpt
import torch
import torch.nn.functional as F
from table import print_table

from lmstack.checkpoints import load_hf
from lmstack.train import CausalLMObjective, build_optimizer


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a square matmul, best of ``repeats`` (the denominator of MFU)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_rate(loss_fn, model, batches, warmup: int) -> float:
    """Median tokens/s of optimizer steps; ``loss_fn(model, x, y) -> loss``."""
    optimizer = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95))
    model.train()
    rates = []
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        loss = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if i >= warmup:
            rates.append(x.numel() / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size of the peak measurement")
    args = parser.parse_args()
    import transformers  # the reference, benchmark-only

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                                        n_positions=args.block, vocab_size=args.vocab, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0)
    reference = transformers.GPT2LMHeadModel(hf_config)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = load_hf(directory)
    plain = nanogpt.NanoGPT(args.vocab, args.block, args.n_layer, args.n_head, args.n_embd)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, args.vocab, (args.batch, args.block), generator=g),) * 2
               for _ in range(args.warmup + args.steps)]
    batches = [(x, torch.roll(x, -1, 1)) for x, _ in batches]

    peak = matmul_peak(args.peak_size)
    d, L, T = args.n_embd, args.n_layer, args.block
    matmul_params = L * 12 * d * d + args.vocab * d  # blocks' projections + the LM head
    flops_per_token = 6 * matmul_params + 12 * L * T * d

    objective = CausalLMObjective()  # what lmstack's Trainer runs: LM head fused with the loss
    runs = {
        "transformers GPT2LMHeadModel": (lambda m, x, y: m(x, labels=x).loss, reference),
        "nanoGPT-style reference": (lambda m, x, y: F.cross_entropy(m(x).flatten(0, 1), y.flatten()), plain),
        "lmstack Decoder": (lambda m, x, y: objective(m, (x, y))[0], ours),
    }
    rates = {name: train_rate(fn, model, batches, args.warmup) for name, (fn, model) in runs.items()}
    print(f"GPT shape: {L} layers, width {d}, {args.n_head} heads, block {T}, vocab {args.vocab}, batch {args.batch}, "
          f"fp32, torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; {flops_per_token / 1e6:.0f} MFLOP per token")
    header = ("model", "tokens/s", "MFU", "lmstack speed-up")
    ours_rate = rates["lmstack Decoder"]
    rows = [(name, f"{rate:.0f}", f"{100 * rate * flops_per_token / peak:.0f}%", f"{ours_rate / rate:.2f}x")
            for name, rate in rates.items()]
    print_table(header, rows)


if __name__ == "__main__":
    main()
