"""Naive vs tiled (flash) vs fused SDPA attention: time and peak memory at T = 1k, 2k, 4k, 8k.

Each (backend, T) runs in a fresh subprocess so its peak memory is its own: on CPU the rise of the
process's peak resident set over its size just before the call, on CUDA torch.cuda.max_memory_allocated.
Causal self-attention, batch 1, 8 heads of 64, fp32 on CPU (bf16 on CUDA).

    python benchmarks/attention.py [--device cuda] [--lengths 1024 2048 4096 8192] [--heads 8]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from table import print_table

from lmstack.nn import AttentionMask, attend

BACKENDS = ("eager", "flash", "sdpa")
LABELS = {"eager": "naive", "flash": "tiled", "sdpa": "SDPA"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(backend: str, length: int, heads: int, device: str, repeats: int) -> dict:
    """Run one measurement and return {"ms", "peak_mib", "max_diff"}."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, length, 64, device=device, dtype=dtype) for _ in range(3))
    mask = AttentionMask(causal=True)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mib()
    out = attend(q, k, v, mask, backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    reference = attend(q, k, v, mask, backend="sdpa")
    max_diff = (out.float() - reference.float()).abs().max().item()
    del reference
    start = time.perf_counter()
    for _ in range(repeats):
        attend(q, k, v, mask, backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"ms": 1000 * (time.perf_counter() - start) / repeats, "peak_mib": max(peak, 0.0), "max_diff": max_diff}


def measure(backend: str, length: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, str(length), "--heads", str(args.heads),
           "--device", args.device, "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"ms": float("nan"), "peak_mib": float("nan"), "max_diff": float("nan"), "error": done.stderr[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.heads, args.device, args.repeats)))
        return
    print(f"causal attention, batch 1, {args.heads} heads x 64, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = ["T"] + [f"{LABELS[b]} ms" for b in BACKENDS] + [f"{LABELS[b]} MiB" for b in BACKENDS] + \
             ["tiled MiB per 1k T", "naive/tiled mem", "tiled max|diff|"]
    rows = []
    for length in args.lengths:
        r = {b: measure(b, length, args) for b in BACKENDS}
        rows.append([f"{length}"] + [f"{r[b]['ms']:.1f}" for b in BACKENDS] + [f"{r[b]['peak_mib']:.1f}" for b in BACKENDS]
                    + [f"{r['flash']['peak_mib'] / (length / 1024):.1f}",
                       f"{r['eager']['peak_mib'] / max(r['flash']['peak_mib'], 1e-9):.1f}x",
                       f"{r['flash']['max_diff']:.1e}"])
        for b in BACKENDS:
            if "error" in r[b]:
                print(f"  {b} at T={length} failed: {r[b]['error']}", file=sys.stderr)
    print_table(header, rows)


if __name__ == "__main__":
    main()
