"""Worked plans for Llama 7B and 70B on 8 to 512 GPUs: memory and step time per layout from the model of
``lmstack.parallel.estimate`` (no GPU is used; the numbers are the model's, not measurements), and the
fastest layout that fits for each size. Each layout takes the micro-batch (sequences per data-parallel group
at a time, 1 to 32) that fits and gives the shortest step: fewer micro-batches, fewer ZeRO-3 re-gathers.

    python benchmarks/parallel_plans.py [--gpus 8 64 512] [--batch-tokens 4194304] [--mfu 0.4] [--network-gbs 45]
"""

import argparse

from table import print_table

from lmstack.errors import ConfigError
from lmstack.parallel.estimate import LLAMA_7B, LLAMA_70B, Hardware, estimate

LAYOUTS = [(strategy, tp) for tp in (1, 2, 8) for strategy in ("ddp", "zero1", "zero3")]
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--batch-tokens", type=float, default=4 * 2**20, help="global batch in tokens")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of the bf16 peak the matmuls reach")
    parser.add_argument("--network-gbs", type=float, default=45.0,
                        help="bus bandwidth per GPU across nodes, GB/s (45: 400 Gb/s InfiniBand; 12: 100 Gb/s Ethernet)")
    args = parser.parse_args()
    hardware = Hardware(mfu=args.mfu, network_bandwidth=args.network_gbs * 1e9)
    rows, best = [], []
    for name, shape in (("7B", LLAMA_7B), ("70B", LLAMA_70B)):
        for gpus in args.gpus:
            fitting = []
            for strategy, tp in LAYOUTS:
                options = []
                for micro_batch in MICRO_BATCHES:
                    try:
                        options.append((micro_batch, estimate(shape, gpus, tp, strategy, micro_batch,
                                                              args.batch_tokens, hardware=hardware)))
                    except ConfigError:  # tp does not fit the GPUs, or the batch has too few sequences
                        continue
                if not options:
                    continue
                fit = [o for o in options if o[1].fits]
                micro_batch, e = min(fit, key=lambda o: o[1].step_s) if fit else options[0]
                rows.append((name, str(gpus), f"{strategy} x tp {tp}", str(micro_batch) if fit else "-",
                             f"{e.states_bytes / 1e9:.1f}", f"{e.activation_bytes / 1e9:.1f}",
                             "yes" if e.fits else "no", f"{e.compute_s:.2f}", f"{e.data_parallel_s:.2f}",
                             f"{e.tensor_parallel_s:.2f}", f"{e.step_s:.2f}" if e.fits else "-"))
                if e.fits:
                    fitting.append((e.step_s, strategy, tp, e))
            if fitting:
                step, strategy, tp, e = min(fitting, key=lambda f: f[0])
                best.append((name, str(gpus), f"{strategy} x tp {tp}", f"{step:.2f}",
                             f"{args.batch_tokens / step / gpus:.0f}", f"{args.mfu * e.compute_s / step:.2f}"))
            else:
                best.append((name, str(gpus), "nothing fits", "-", "-", "-"))
    print(f"bf16 mixed precision, Adam, activation checkpointing; H100 80 GB, {hardware.gpus_per_node} per node, "
          f"MFU {args.mfu}, {args.network_gbs:g} GB/s per GPU across nodes; global batch "
          f"{args.batch_tokens / 2**20:g}M tokens of 4096-token sequences")
    print_table(("model", "GPUs", "layout", "micro-batch", "states GB", "activations GB", "fits", "compute s",
                 "data-parallel s", "tensor-parallel s", "step s"), rows)
    print()
    print_table(("model", "GPUs", "fastest layout that fits", "step s", "tokens/s/GPU", "effective MFU"), best)


if __name__ == "__main__":
    main()
