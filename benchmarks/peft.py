"""PEFT training cost on SmolLM2-135M (fp32, CPU): full fine-tuning vs LoRA / DoRA / QLoRA in lmstack, and
peft's LoRA / DoRA on the same base in transformers: trainable parameters, peak resident memory, seconds
per optimizer step (batch --batch x --seq tokens, AdamW, the same random token batches everywhere).

Each configuration runs in a process of its own (peak memory is a per-process figure, the kernel's VmHWM:
"peak" includes loading, "train peak" is reset after loading and so covers the training steps only),
configurations are
interleaved across --rounds, and the median step time is reported. LoRA: rank 8, alpha 16, targets
q_proj and v_proj (peft's default for Llama); QLoRA: the linears of the blocks in NF4, embedding and head fp32.
"+ckpt" rows add activation checkpointing (lmstack.nn.checkpointing; transformers' gradient checkpointing for
peft), the memory recipe QLoRA is trained with; "+lowmem" rows make the allocator unmap large frees
(lmstack.nn.memory.unmap_large_frees: what every `lmstack finetune` PEFT run sets, and
`--model.activation_checkpointing`);
"vs full" compares with full fine-tuning with neither.

    python benchmarks/peft.py [--steps 3] [--rounds 2] [--batch 4] [--seq 256]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# "+ckpt": activation checkpointing (each block recomputed in backward), as QLoRA recipes train.
CONFIGS = ["lmstack full", "lmstack lora", "lmstack dora", "lmstack qlora", "peft lora", "peft dora",
           "lmstack lora+ckpt", "lmstack qlora+ckpt", "peft lora+ckpt",
           "lmstack full+lowmem", "lmstack lora+lowmem", "lmstack dora+lowmem", "lmstack qlora+lowmem",
           "peft lora+lowmem", "lmstack lora+ckpt+lowmem", "lmstack qlora+ckpt+lowmem"]


def _reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (VmHWM) here: writing 5 to clear_refs (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """VmHWM: the largest resident set since the process started or since ``_reset_peak_rss``."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _lmstack_model(base_dir: Path, method: str, checkpointing: bool):
    import functools

    from lmstack.nn.checkpointing import checkpoint_layers_

    from lmstack.checkpoints import load_model
    from lmstack.compress import quantize_
    from lmstack.peft import apply_lora

    lora = functools.partial(apply_lora, targets=["q_proj", "v_proj"], rank=8, alpha=16, use_dora=method == "dora")
    transforms = {"full": [], "lora": [lora], "dora": [lora],
                  "qlora": [functools.partial(quantize_, scheme="nf4", lm_head=False), lora]}[method]
    model = load_model(base_dir, transforms=transforms)
    return (checkpoint_layers_(model) if checkpointing else model).train()


def _peft_model(base_dir: Path, method: str, checkpointing: bool):
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]  # this file is peft.py too
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=method == "dora")
    if checkpointing:  # as peft's QLoRA recipe (prepare_model_for_kbit_training) does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return peft.get_peft_model(model, config).train()


def child(name: str, base_dir: Path, steps: int, batch: int, seq: int) -> dict:
    """One configuration: load, one warm-up step, ``steps`` timed steps; the figures as a dict."""
    import torch

    torch.manual_seed(0)
    library, method = name.split()
    method, *options = method.split("+")
    if "lowmem" in options:
        from lmstack.nn.memory import unmap_large_frees

        unmap_large_frees()
    build = _lmstack_model if library == "lmstack" else _peft_model
    model = build(base_dir, method, "ckpt" in options)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 49152, (batch, seq + 1), generator=generator) for _ in range(steps + 1)]
    if library == "lmstack":
        from lmstack.train import CausalLMObjective

        objective = CausalLMObjective()
        loss_of = lambda ids: objective(model, (ids[:, :-1], ids[:, 1:]))[0]  # noqa: E731
    else:
        loss_of = lambda ids: model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # noqa: E731 (HF shifts itself)
    load_peak = _peak_rss_mib()
    reset = _reset_peak_rss()  # no sampling thread: it would take the GIL from the training loop
    times = []
    for i, ids in enumerate(batches):
        start = time.perf_counter()
        loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in params)
    train_peak = _peak_rss_mib() if reset else float("nan")
    return {"name": name, "trainable": trainable, "peak_mib": max(load_peak, _peak_rss_mib()),
            "train_peak_mib": train_peak, "step_s": statistics.median(times), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=CONFIGS, help="run these configurations only")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.base, args.steps, args.batch, args.seq)))
        return
    from table import print_table

    from lmstack.checkpoints import load_model, save_hf
    from lmstack.recipes.bundled import resolve_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        base = save_hf(load_model(resolve_model_dir("smollm2-135m-instruct")), Path(tmp) / "smollm2")  # fp32 HF dir
        results: dict[str, list[dict]] = {name: [] for name in args.only or CONFIGS}
        for round_ in range(args.rounds):
            for name in results:
                command = [sys.executable, __file__, "--child", name, "--base", str(base), "--steps", str(args.steps),
                           "--batch", str(args.batch), "--seq", str(args.seq)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name}: failed\n{done.stderr[-2000:]}")
                    continue
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1} {name}: {results[name][-1]['step_s']:.2f} s/step", flush=True)
    full = results.get("lmstack full", [])
    full_peak = statistics.median(r["peak_mib"] for r in full) if full else None
    full_train = statistics.median(r["train_peak_mib"] for r in full) if full else None
    peft_lora = statistics.median(r["step_s"] for r in results["peft lora"]) if results.get("peft lora") else None
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        peak = statistics.median(r["peak_mib"] for r in runs)
        train_peak = statistics.median(r["train_peak_mib"] for r in runs)
        step = statistics.median(r["step_s"] for r in runs)
        rows.append((name, f"{runs[0]['trainable']:,}", f"{peak:.0f}", f"{peak / full_peak:.2f}x" if full_peak else "-",
                     f"{train_peak:.0f}", f"{train_peak / full_train:.2f}x" if full_train else "-", f"{step:.2f}",
                     f"{peft_lora / step:.2f}x" if peft_lora else "-"))
    print(f"\nSmolLM2-135M, batch {args.batch} x {args.seq} tokens, fp32, {os.environ.get('OMP_NUM_THREADS', 'all')} "
          f"threads, median of {args.rounds} rounds x {args.steps} steps")
    print_table(("config", "trainable", "peak MiB", "vs full", "train peak MiB", "vs full", "s/step", "vs peft lora"), rows)


if __name__ == "__main__":
    main()
