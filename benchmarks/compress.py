"""Pruning and distillation, one run: size on disk, decode tokens/s and held-out quality of each compressed model.

For each model (the quickstart model trained by `lmstack quickstart`, and SmolLM2-135M-Instruct from the bundled
GGUF, dequantised): fp32; 50% unstructured sparsity by magnitude, Wanda and SparseGPT; 2:4 by SparseGPT;
structured 25% / 50% (query heads within KV groups and MLP channels, ranked by activation importance), before
and after a short recovery fine-tune; a half-depth student distilled from the model (``lmstack distill``, KD
with T = 2, its blocks the teacher's most influential ones, ``--student.pick influence``) and the same
student trained from scratch for the same
wall-clock (its steps sized by a timing run); and the distilled student quantized to int8. Every row is made
by the commands a user runs (``lmstack prune``, ``finetune``, ``distill``, ``quantize``).

The 2:4 model is measured twice: with its zeros stored densely (the file, and what the dense kernels read)
and packed as its nonzero half with 2-bit positions (``lmstack.compress.semi_sparse``: a CPU kernel reading
0.53x the bytes of each linear). "memory MB" is the bytes of the weights in memory as decoded.

Quality: bits per byte and perplexity over --eval-windows held-out windows (quickstart: its 4 held-out plays;
SmolLM2: Shakespeare texts n-z, never used for calibration or training, which use texts a-m). Decode: batch 1,
greedy, --new-tokens after a 16-token prompt through the fused CPU step, the median of --repeats rounds run
interleaved over all rows. Sparse kernels: torch's CSR matrix-vector product over every pruned linear of the
model at the sparsity reached, against the dense product (decode's shape, one row).

    python benchmarks/compress.py [--models runs/quickstart/model smollm2-135m-instruct] [--distill-seconds 240]
"""

import argparse
import contextlib
import copy
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from table import print_table

from lmstack.checkpoints import save_hf
from lmstack.checkpoints.model_files import open_model
from lmstack.compress import keep_layers, quantized_bytes
from lmstack.compress.semi_sparse import semi_sparse_
from lmstack.compress.files import load_any_model
from lmstack.config import resolve
from lmstack.data import read_documents, shakespeare_files, split_documents
from lmstack.generate import GenerationConfig, generate
from lmstack.kernels import use_skinny_linears_
from lmstack.recipes import distill, finetune, prune, quantize
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.distill import DistillConfig
from lmstack.recipes.configs.finetune import FinetuneConfig
from lmstack.recipes.configs.prune import PruneConfig
from lmstack.recipes.configs.quantize import QuantizeConfig
from lmstack.train.trainer import read_metrics

SMOLLM2 = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["runs/quickstart/model", SMOLLM2])
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--train-chars", type=int, default=1_500_000, help="training text for recovery / distillation")
    parser.add_argument("--recovery-steps", type=int, nargs=2, default=[200, 40], metavar=("QUICKSTART", "SMOLLM2"))
    parser.add_argument("--distill-seconds", type=float, nargs=2, default=[120.0, 240.0],
                        metavar=("QUICKSTART", "SMOLLM2"), help="training budget of the student (and of scratch)")
    parser.add_argument("--no-training", action="store_true", help="only the rows that need no training (no recovery, "
                        "no students): the pruning methods and their speed, in a fraction of the time")
    parser.add_argument("--students-only", action="store_true", help="only fp32, the two students and the int8 "
                        "student: the distillation target, without the pruning rows")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name in args.models:
        if name != SMOLLM2 and not Path(name, "config.json").is_file():
            print(f"skipping {name}: no checkpoint there (run `lmstack quickstart` first)")
            continue
        with tempfile.TemporaryDirectory(prefix="lmstack-compress-") as tmp:
            section(name, args, Path(tmp))


def section(name: str, args, work: Path) -> None:
    small = name != SMOLLM2
    files = open_model(resolve_model_dir(name))
    tokenizer = files.tokenizer
    texts = shakespeare_files()
    if small:  # the quickstart's own split (configs/pretrain/shakespeare.yaml: 10% held out, seed 1337)
        train_docs, eval_docs = split_documents(read_documents(texts), 0.1, 1337)
    else:
        train_docs = read_documents([f for f in texts if f.name[0] <= "m"])
        eval_docs = read_documents([f for f in texts if f.name[0] > "m"])
    window = min(args.window, files.model.config.max_seq_len)
    train_txt = work / "train.txt"
    train_txt.write_text("\n\n".join(d.text for d in train_docs)[:args.train_chars], encoding="utf-8")
    calibration_txt = work / "calibration.txt"
    calibration_txt.write_text("\n\n".join(d.text for d in train_docs)[:400_000], encoding="utf-8")  # >> 8k tokens
    windows = token_windows(tokenizer, eval_docs, window, args.eval_windows, seed=2)
    token_bytes = torch.tensor(tokenizer.byte_lengths() + [0] * (files.model.config.vocab_size - tokenizer.vocab_size))
    base = work / "fp32"
    save_hf(files.model.float(), base)
    tokenizer.save(base)
    which = 0 if small else 1
    steps, seconds = args.recovery_steps[which], args.distill_seconds[which]
    block, batch = window, 8 if small else 4
    lr = (1e-3, 1e-4)[which]  # recovery; the students: (distilled, scratch) learning rates below
    student_lr = ((1e-3, 3e-3), (1e-3, 1e-3))[which]

    def pruned(label: str, **flags) -> Path:
        out = work / label
        quiet(prune.run, work, PruneConfig(source=base, output=out, calibration=[str(calibration_txt)],
                              calibration_tokens=args.calibration_tokens, calibration_seq_len=window, **flags))
        return out

    def finetuned(label: str, source: Path, max_steps: int) -> Path:
        out = work / label
        quiet(finetune.run, work, resolve(FinetuneConfig, None, {
            "task": "causal_lm", "out": str(out), "model.path": str(source), "data.train": str(train_txt),
            "data.max_length": str(block), "train.max_steps": str(max_steps), "train.batch_size": str(batch),
            "train.lr": str(lr), "train.min_lr": str(lr / 10),
            "train.warmup_steps": str(min(20, max_steps // 10)), "train.eval_every": "0",
            "train.checkpoint_every": "1000000", "train.keep_checkpoints": "1", "train.progress": "false"}))
        return out / "model"

    rows: dict[str, dict] = {"fp32": {"dir": base}}
    if not args.students_only:
        rows["magnitude 50%"] = {"dir": pruned("magnitude", method="magnitude", sparsity=0.5)}
        rows["wanda 50%"] = {"dir": pruned("wanda", method="wanda", sparsity=0.5)}
        rows["sparsegpt 50%"] = {"dir": pruned("sparsegpt", method="sparsegpt", sparsity=0.5)}
        rows["sparsegpt 2:4"] = {"dir": pruned("sparsegpt-24", method="sparsegpt", pattern="2:4")}
        for fraction in (0.25, 0.5):
            label = f"structured {fraction:.0%}"
            cut = pruned(f"structured-{fraction}", method="none", heads=_head_fraction(fraction, files.model.config),
                         channels=fraction, importance="activation")
            rows[f"{label} (no recovery)"] = {"dir": cut}
            if not args.no_training:
                rows[f"{label} + recovery"] = {"dir": finetuned(f"recovered-{fraction}", cut, steps), "steps": steps}
    if not args.no_training:
        distilled, scratch = _students(base, work, tokenizer, train_txt, block, batch, seconds, *student_lr)
        rows["distilled student (1/2 depth)"] = distilled
        rows["same student from scratch"] = scratch
        int8 = work / "student-int8"
        quiet(quantize.run, work, QuantizeConfig(source=distilled["dir"], output=int8, scheme="int8"))
        rows["distilled student int8"] = {"dir": int8}

    models = {label: load_any_model(r["dir"]).float().eval() if label != "distilled student int8"
              else load_any_model(r["dir"]).eval() for label, r in rows.items()}
    for label, model in models.items():
        rows[label].update(quality(model, windows, token_bytes), disk=_disk(rows[label]["dir"]),
                           sparsity=_sparsity(model), params=sum(p.numel() for p in model.parameters()))
    if "distilled student int8" in rows:  # its codes are buffers: count the student's weights
        rows["distilled student int8"]["params"] = rows["distilled student (1/2 depth)"]["params"]
    packed = "sparsegpt 2:4, packed (2:4 kernel)"  # the same weights, stored as their nonzero half
    if "sparsegpt 2:4" in rows:
        models[packed] = copy.deepcopy(models["sparsegpt 2:4"])
        semi_sparse_(models[packed])
        rows[packed] = {**rows["sparsegpt 2:4"], **quality(models[packed], windows, token_bytes)}
        order = [k for k in rows if k != packed]
        order.insert(order.index("sparsegpt 2:4") + 1, packed)
        rows = {k: rows[k] for k in order}
    for label, model in models.items():
        rows[label]["memory"] = quantized_bytes(model)
    rates = decode_rates({k: use_skinny_linears_(m, hugepages=False) for k, m in models.items()},
                         windows[0][:, :16], args.new_tokens, args.repeats)
    _print(name, rows, rates, window, len(windows), eval_docs, small)
    if "magnitude 50%" in rows:
        print("sparse CPU kernel (torch CSR, float32) vs dense for one decode token over every pruned linear:")
        print_table(("weights", "sparsity", "dense ms", "CSR ms", "CSR speed-up"),
                    sparse_kernel_rows(models["magnitude 50%"], models["sparsegpt 2:4"]))


def _head_fraction(fraction: float, config) -> float:
    """``fraction`` moved to the nearest step the model's KV groups (or heads) allow: at least one head removed
    from each, at least one kept."""
    group = config.n_heads // config.n_kv_heads
    pool = group if group > 1 else config.n_heads
    return min(max(round(fraction * pool), 1), pool - 1) / pool


def quiet(job, work: Path, cfg):
    """Run a recipe with its printed lines sent to WORK/log.txt (progress bars still show on stderr)."""
    with open(work / "log.txt", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        return job(cfg)


def _students(base: Path, work: Path, tokenizer, train_txt: Path, block: int, batch: int, seconds: float,
              lr: float, scratch_lr: float):
    """The distilled half-depth student and the same shape from scratch, each trained for ``seconds``."""
    teacher = open_model(base).model
    half = teacher.config.n_layers // 2

    def distilled_run(out: Path, steps: int) -> Path:
        quiet(distill.run, work, resolve(DistillConfig, None, {
            "out": str(out), "teacher": str(base), "student.layers": str(half), "data.train": str(train_txt),
            "data.max_length": str(block), "student.pick": "influence", "distill.loss": "kd",
            "distill.temperature": "2.0", "distill.alpha": "0.5",
            "train.max_steps": str(steps), "train.batch_size": str(batch), "train.lr": str(lr),
            "train.min_lr": str(lr / 10), "train.warmup_steps": str(min(20, steps // 10)), "train.eval_every": "0",
            "train.checkpoint_every": "1000000", "train.keep_checkpoints": "1", "train.progress": "false"}))
        return out

    scratch_init = work / "scratch-init"
    torch.manual_seed(0)
    fresh = keep_layers(teacher, list(range(half)))
    fresh.reset_parameters()
    save_hf(fresh, scratch_init)
    tokenizer.save(scratch_init)

    def scratch_run(out: Path, steps: int) -> Path:
        ft = resolve(FinetuneConfig, None, {
            "task": "causal_lm", "out": str(out), "model.path": str(scratch_init), "data.train": str(train_txt),
            "data.max_length": str(block), "train.max_steps": str(steps), "train.batch_size": str(batch),
            "train.lr": str(scratch_lr), "train.min_lr": str(scratch_lr / 10),
            "train.warmup_steps": str(min(50, steps // 10)),
            "train.eval_every": "0", "train.checkpoint_every": "1000000", "train.keep_checkpoints": "1",
            "train.progress": "false"})
        quiet(finetune.run, work, ft)
        return out

    results = {}
    for label, runner in (("distilled", distilled_run), ("scratch", scratch_run)):
        probe = runner(work / f"{label}-timing", 20)
        per_step = statistics.median(_step_seconds(read_metrics(probe / "metrics.jsonl"))[5:])  # past warm-up
        shutil.rmtree(probe)
        steps = max(1, round(seconds / per_step))
        out = runner(work / label, steps)
        records = read_metrics(out / "metrics.jsonl")
        results[label] = {"dir": out / "model", "steps": steps, "train_s": sum(_step_seconds(records))}
    return results["distilled"], results["scratch"]


def _step_seconds(records: list[dict]) -> list[float]:
    seen = [0] + [r["tokens"] for r in records[:-1]]
    return [(r["tokens"] - before) / r["tokens_per_s"] for r, before in zip(records, seen)]


# --- measurements -----------------------------------------------------------------------------------------

def token_windows(tokenizer, documents, window: int, count: int, seed: int) -> list[torch.Tensor]:
    ids = [i for doc in documents for i in tokenizer.encode(doc.text)]
    rng = random.Random(seed)
    return [torch.tensor([ids[s:s + window]]) for s in (rng.randrange(0, len(ids) - window) for _ in range(count))]


def quality(model, windows: list[torch.Tensor], token_bytes: torch.Tensor) -> dict:
    """Held-out bits per byte (nats / ln 2 / UTF-8 bytes of the scored tokens) and perplexity."""
    nats, tokens, n_bytes = 0.0, 0, 0
    with torch.inference_mode():
        for ids in windows:
            logits = model(ids)[:, :-1]
            nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                    reduction="sum").item()
            tokens += ids.shape[1] - 1
            n_bytes += int(token_bytes[ids[:, 1:]].sum())
    return {"bpb": nats / math.log(2) / n_bytes, "ppl": math.exp(nats / tokens)}


def decode_rates(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of each model, rounds interleaved over the models (the machine's drift hits all)."""
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=[])
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            generate(m, prompt, GenerationConfig(max_new_tokens=4, eos_token_id=[]))  # warm-up (kernel build)
        for _ in range(repeats):
            for label, m in models.items():
                start = time.perf_counter()
                generate(m, prompt, config)
                times[label].append(time.perf_counter() - start)
    return {k: new_tokens / statistics.median(v) for k, v in times.items()}


def _disk(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def _sparsity(model) -> float:
    linears = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return sum(int((w == 0).sum()) for w in linears) / max(sum(w.numel() for w in linears), 1) if linears else 0.0


def _print(name: str, rows: dict, rates: dict, window: int, count: int, eval_docs, small: bool) -> None:
    held = "its 4 held-out plays" if small else f"{len(eval_docs)} Shakespeare texts n-z"
    print(f"\n{name}: held-out {count} x {window} tokens from {held}; decode batch 1, greedy, fused CPU step; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    fp32 = rows["fp32"]
    header = ("model", "params", "sparsity", "disk MB", "vs fp32", "memory MB", "decode tok/s", "speed-up",
              "bits/byte", "perplexity", "train steps / s")
    table = []
    for label, r in rows.items():
        trained = (f"{r['steps']} / {r['train_s']:.0f}" if "train_s" in r else str(r["steps"]) if "steps" in r
                   else "-")
        table.append((label, f"{r['params'] / 1e6:.2f}M", f"{r['sparsity']:.1%}", f"{r['disk'] / 1e6:.1f}",
                      f"{r['disk'] / fp32['disk']:.2f}x", f"{r['memory'] / 1e6:.1f}", f"{rates[label]:.1f}",
                      f"{rates[label] / rates['fp32']:.2f}x",
                      f"{r['bpb']:.4f}", f"{r['ppl']:.2f}", trained))
    print_table(header, table)
    if "magnitude 50%" in rows:
        mag = rows["magnitude 50%"]["ppl"]
        for method in ("wanda 50%", "sparsegpt 50%"):
            print(f"target: {method} perplexity below magnitude 50% ({rows[method]['ppl']:.2f} vs {mag:.2f}) -> "
                  f"{'met' if rows[method]['ppl'] < mag else 'MISSED'}")
    if "structured 50% + recovery" in rows:
        speed = rates["structured 50% + recovery"] / rates["fp32"]
        print(f"target: structured 50% + recovery decodes >= 1.7x fp32 ({speed:.2f}x) -> "
              f"{'met' if speed >= 1.7 else 'MISSED'}")
    if "same student from scratch" not in rows:
        return
    d, s = rows["distilled student (1/2 depth)"], rows["same student from scratch"]
    print(f"target: distilled student beats scratch at equal wall-clock ({d['bpb']:.4f} vs {s['bpb']:.4f} bits/byte, "
          f"{d['train_s']:.0f} s vs {s['train_s']:.0f} s) -> {'met' if d['bpb'] < s['bpb'] else 'MISSED'}")


def sparse_kernel_rows(unstructured, two_four, repeats: int = 20) -> list[tuple[str, ...]]:
    """torch's CSR matrix-vector products over every pruned linear against the dense ones (decode's shape)."""
    rows = []
    for label, model in (("50% unstructured (magnitude)", unstructured), ("2:4 (sparsegpt)", two_four)):
        weights = [m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        dense = [copy.deepcopy(w) for w in weights]
        csr = [w.to_sparse_csr() for w in weights]
        xs = [torch.randn(w.shape[1], 1) for w in weights]
        timing = {}
        with torch.inference_mode():
            for kind, mats, op in (("dense", dense, lambda w, x: w @ x), ("csr", csr, torch.sparse.mm)):
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    for w, x in zip(mats, xs):
                        op(w, x)
                    samples.append(time.perf_counter() - start)
                timing[kind] = statistics.median(samples)
        rows.append((label, f"{_sparsity(model):.1%}", f"{timing['dense'] * 1e3:.2f}", f"{timing['csr'] * 1e3:.2f}",
                     f"{timing['dense'] / timing['csr']:.2f}x"))
    return rows


if __name__ == "__main__":
    main()
