"""Distributed training on CPU (gloo): measured per-rank memory and tokens/s per strategy, beside ZeRO's formulas.

For 1, 2 and 4 ranks (``torchrun`` launches of this file) and each strategy the world allows (DDP, ZeRO-1,
ZeRO-2, ZeRO-3, tensor parallel), a Llama (--dim, --layers) trains --steps AdamW steps on random tokens through
``lmstack.parallel``. Measured on rank 0, by summing the bytes of the tensors it holds (a DTensor's local
shard): parameters and gradients (after a backward), optimizer state (after a step), activations (the
bytes autograd saves for backward in one forward, counted by ``saved_tensors_hooks``, the weights a matmul
saves left out), and the peak (the most tensor bytes alive at once during one step, from torch's MemTracker:
FSDP's gathered parameters, gradients in flight and temporaries included). Beside them the fp32
formulas of the ZeRO paper (Rajbhandari et al. 2020, sec. 5) with Psi parameters on N ranks: parameters
4 Psi (ZeRO-3: 4 Psi / N), gradients 4 Psi (ZeRO-2/3: / N), Adam moments 8 Psi (ZeRO-1/2/3: / N); tensor
parallelism divides the split layers by N (norms stay whole). Parameters are counted at rest: FSDP2 keeps
them sharded between steps for ZeRO-2 as well; ZeRO-2 differs from ZeRO-3 in gathering once per step
(it keeps the gathered parameters from forward to backward), so its peak is higher than ZeRO-3's.
tokens/s: global tokens per second of the median step (2 CPU cores shared by all ranks: a measure of each
strategy's overhead here, not of scaling).

    python benchmarks/parallel.py [--dim 256 --layers 4 --batch 8 --seq 128 --steps 6 --worlds 1 2 4]
"""

import argparse
import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from table import print_table

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {1: ["single"], 2: ["ddp", "zero1", "zero2", "zero3", "tp"], 4: ["ddp", "zero1", "zero2", "zero3", "tp"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="steps per strategy (the first one is not timed)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return _worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = Path(tmp) / f"world-{world}.jsonl"
            _launch(world, out, sys.argv[1:])
            rows += [json.loads(line) for line in out.read_text().splitlines()]
    psi = rows[0]["psi"]
    print(f"Llama dim {args.dim}, {args.layers} layers, vocab {args.vocab}: Psi = {psi / 1e6:.2f}M parameters; "
          f"global batch {args.batch} x {args.seq} tokens; fp32; gloo on {os.cpu_count()} CPU cores")
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    print_table(("ranks", "strategy", "params MiB", "(formula)", "grads MiB", "(formula)", "Adam MiB", "(formula)",
                 "activations MiB", "peak MiB", "tokens/s"),
                [(str(r["world"]), r["strategy"], mib(r["params"]), mib(r["formula"][0]), mib(r["grads"]),
                  mib(r["formula"][1]), mib(r["optimizer"]), mib(r["formula"][2]), mib(r["activations"]),
                  mib(r["peak"]), f"{r['tokens_per_s']:.0f}") for r in rows])


def _launch(world: int, out: Path, argv: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
               "127.0.0.1", "--master-port", str(port), __file__, *argv, "--worker", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the {world}-rank launch failed:\n{result.stderr[-4000:]}")


def formulas(strategy: str, psi: int, n: int, tp_split: int) -> tuple[float, float, float]:
    """(parameter, gradient, Adam-state) bytes per rank, fp32: the ZeRO paper's, and tensor parallelism's
    (``tp_split`` of the ``psi`` parameters are divided over the ranks)."""
    if strategy == "tp":
        local = tp_split / n + (psi - tp_split)
        return 4 * local, 4 * local, 8 * local
    params = 4 * psi / n if strategy == "zero3" else 4 * psi
    grads = 4 * psi / n if strategy in ("zero2", "zero3") else 4 * psi
    adam = 8 * psi / n if strategy in ("zero1", "zero2", "zero3") else 8 * psi
    return params, grads, adam


def _bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _activations(saved: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors autograd saved for backward, each once, less the parameters (a matmul saves its weight,
    or a transposed view of it: bytes the parameters column already counts and that do not grow with rows)."""
    unique = {id(t): t for t in saved}.values()
    return [t for t in unique if not isinstance(t if t._base is None else t._base, torch.nn.Parameter)]


def _train_step(objective, module, optimizer, plan, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    if plan is None:
        objective(module, batch)[0].backward()
    else:
        plan.forward_backward(objective, batch, 1.0)
    optimizer.step()


def _peak_bytes(step, module, optimizer) -> int:
    """The most bytes of tensors alive at once on this rank during one more ``step()`` (parameters, gradients,
    optimizer state, activations, FSDP's gathered parameters, temporaries): torch's MemTracker, which follows
    every storage made or freed under a dispatch mode (the CPU has no allocator statistics to read)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module, optimizer)
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return max(stats["Total"] for stats in snapshot.values())


def _worker(args) -> None:
    import dataclasses

    from lmstack.models import build_model
    from lmstack.models.presets import get_preset
    from lmstack.parallel import ParallelConfig, init_distributed, parallelize, shutdown
    from lmstack.train.objectives import CausalLMObjective
    from lmstack.train.optim import param_groups

    world = init_distributed("gloo", timeout_s=600)
    n = world.world_size
    config = dataclasses.replace(get_preset("tiny-llama"), vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                                 n_heads=8, n_kv_heads=4, ffn_dim=4 * args.dim, max_seq_len=args.seq,
                                 tie_embeddings=False)
    objective, records = CausalLMObjective(), []
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    for strategy in STRATEGIES[n]:
        model = build_model(config, seed=0).train()
        psi = sum(p.numel() for p in model.parameters())
        tp_split = sum(p.numel() for name, p in model.named_parameters() if "norm" not in name)
        if strategy == "single":
            module, optimizer, plan = model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), None
            batch = (tokens[:, :-1], tokens[:, 1:])
        else:
            layout = {"tp": n, "dp": 1} if strategy == "tp" else {"dp": n, "strategy": strategy}
            plan = parallelize(model, ParallelConfig(**layout), world, seed=0)
            module = plan.params_module
            optimizer = plan.make_optimizer(param_groups(module, 0.0), lr=1e-4)
            batch = plan.shard_data(_Fixed(tokens)).next_batch()
        step = functools.partial(_train_step, objective, module, optimizer, plan, batch)

        seconds, activations = [], 0
        for index in range(args.steps):
            started = time.perf_counter()
            if index == 0:  # count what autograd saves for backward in one forward
                optimizer.zero_grad(set_to_none=True)
                saved = []
                context = plan.loss_context() if plan is not None else contextlib.nullcontext()
                with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), context:
                    loss, _ = objective(module if plan is None else plan.module, batch)
                activations = _bytes(_activations(saved))
                with plan.loss_context() if plan is not None else contextlib.nullcontext():
                    loss.backward()
                grads = _bytes(p.grad for p in module.parameters() if p.grad is not None)
                optimizer.step()
            else:
                step()
            seconds.append(time.perf_counter() - started)
        peak = _peak_bytes(step, module, optimizer)
        state = getattr(optimizer, "optim", optimizer).state  # ZeroRedundancyOptimizer: this rank's share
        adam = _bytes(v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        record = {"world": n, "strategy": strategy, "psi": psi, "params": _bytes(module.parameters()), "grads": grads,
                  "optimizer": adam, "activations": activations, "peak": peak,
                  "formula": formulas("ddp" if strategy == "single" else strategy, psi, n, tp_split),
                  "tokens_per_s": args.batch * args.seq / statistics.median(seconds[1:])}
        records.append(record)
        del model, module, optimizer, plan
    if world.is_main:
        args.worker.write_text("".join(json.dumps(r) + "\n" for r in records))
    shutdown()


class _Fixed:
    """One batch of token rows, as (inputs, targets)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def next_batch(self):
        return self.tokens[:, :-1], self.tokens[:, 1:]


if __name__ == "__main__":
    main()
