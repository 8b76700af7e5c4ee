"""Mixture of experts vs dense at equal compute: quality for the same training time, and decode speed.

Training: configs/pretrain/shakespeare.yaml (dense, SwiGLU of width F) and configs/pretrain/shakespeare-moe.yaml
(8 experts of width F/2, top-2: the same active parameters per token) are each trained for --seconds of
training loop on the Shakespeare corpus. Each run's step count is set from a short calibration run of the
same model (its cosine schedule must end when the time does), so both get the same wall-clock. Reported:
held-out bits per byte (the whole held-out split), training tokens/s, and the router's balance (the
busiest expert's share of assignments relative to an even split, the least-used expert's, router entropy),
averaged over the last tenth of the run.

Decoding: the trained MoE model (a Mixtral checkpoint) decoded greedily, batch 1, by transformers'
MixtralForCausalLM and by lmstack (eager PyTorch, and the CPU kernels' fused step) on the same weights, and a
larger random Mixtral (--decode-dim ...) likewise. Decode tokens/s excludes the prompt (as benchmarks/generate.py);
the weight bytes one decode step reads are counted by hooks on every linear the eager step calls (the
fused step calls the same experts: tests/kernels/test_fused_step.py poisons the others with NaN).

    python benchmarks/moe.py [--seconds 600] [--decode-dim 512 --decode-layers 8 --decode-expert-dim 1024]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from generate import decode_rate
from table import print_table

from lmstack.checkpoints import load_hf
from lmstack.config import resolve
from lmstack.generate import GenerationConfig, generate
from lmstack.kernels import load_cpu_kernels, use_skinny_linears_
from lmstack.nn.kv_cache import StaticKVCache
from lmstack.nn.moe import active_parameters
from lmstack.recipes.pretrain import PretrainConfig, run
from lmstack.train.trainer import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"dense": ROOT / "configs/pretrain/shakespeare.yaml", "moe": ROOT / "configs/pretrain/shakespeare-moe.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="training seconds for each model")
    parser.add_argument("--calibration-steps", type=int, default=40, help="steps timed to size each run")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for both recipes (smaller models for a smoke run), e.g. model.dim=32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-dim", type=int, default=512, help="the random Mixtral's width (0: skip it)")
    parser.add_argument("--decode-layers", type=int, default=8)
    parser.add_argument("--decode-expert-dim", type=int, default=1024)
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        results = {name: _train(name, out, args.seconds, args.calibration_steps, overrides) for name in CONFIGS}
        _print_training(results, args.seconds)
        decode_rows = [_decode_row("trained MoE (above)", results["moe"]["model_dir"], args.new_tokens, args.repeats)]
        if args.decode_dim:
            decode_rows.append(_random_mixtral_row(args, Path(tmp)))
    print()
    print(f"Decoding, batch 1, greedy, {args.new_tokens} new tokens after a 64-token prompt, median of "
          f"{args.repeats}; CPU kernels {'built' if load_cpu_kernels() else 'UNAVAILABLE'}")
    header = ("model", "parameters", "MB read/token", "of all weights", "transformers", "lmstack eager",
              "lmstack kernels", "vs transformers", "same tokens")
    print_table(header, decode_rows)


# --- training at equal wall-clock ---------------------------------------------------------------------------

def _config(name: str, out: Path, overrides: dict, **more) -> PretrainConfig:
    # No periodic evaluation or checkpoints: the runs' clocks measure training; the final step evaluates the
    # whole held-out split.
    keys = {"out": str(out), "train.eval_every": "0", "train.checkpoint_every": "1000000", "train.progress": "false",
            **overrides, **more}
    return resolve(PretrainConfig, CONFIGS[name], keys)


def _step_seconds(records: list[dict]) -> list[float]:
    """Each logged step's training time, from its tokens and tokens/s (evaluation not counted)."""
    seen = [0] + [r["tokens"] for r in records[:-1]]
    return [(r["tokens"] - before) / r["tokens_per_s"] for r, before in zip(records, seen)]


def _train(name: str, out: Path, seconds: float, calibration_steps: int, overrides: dict) -> dict:
    tokenizer = out / "dense-calibration" / "tokenizer"
    shared = {} if name == "dense" else {"tokenizer.path": str(tokenizer)}
    calibration = _config(name, out / f"{name}-calibration", overrides, **shared,
                          **{"train.max_steps": str(calibration_steps)})
    run(calibration)
    times = _step_seconds(read_metrics(calibration.out / "metrics.jsonl"))[1:]
    per_step = statistics.median(times[len(times) // 3:])  # past the first, slower steps
    cfg = _config(name, out / name, overrides, **{"tokenizer.path": str(tokenizer)},
                  **{"train.max_steps": str(max(1, round(seconds / per_step)))})
    result = run(cfg)
    records = read_metrics(cfg.out / "metrics.jsonl")
    trained, steps = sum(_step_seconds(records)), len(records)
    tail = records[-max(1, len(records) // 10):]
    balance = {key: statistics.mean(r[key] for r in tail) for key in tail[0] if key.startswith("moe_")}
    model = load_hf(result.model_dir)
    return {"model_dir": result.model_dir, "steps": steps, "seconds": trained, "tokens": records[-1]["tokens"],
            "bpb": result.final["eval_bpb"], "params": sum(p.numel() for p in model.parameters()),
            "active": active_parameters(model), "balance": balance}


def _print_training(results: dict, seconds: float) -> None:
    print(f"Shakespeare, a budget of {seconds:.0f} s of training each, sized in steps by a calibration run (the "
          f"seconds each really trained are in the table; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    header = ("model", "parameters", "active/token", "steps", "train s", "train tok/s", "held-out bits/byte",
              "busiest expert", "least-used expert", "router entropy")
    rows = []
    for name, r in results.items():
        b = r["balance"]
        loads = [v for k, v in b.items() if k.startswith("moe_load_") and k[9:].isdigit()]
        experts = len(loads)
        rows.append((CONFIGS[name].name, f"{r['params'] / 1e6:.2f}M", f"{r['active'] / 1e6:.2f}M", str(r["steps"]),
                     f"{r['seconds']:.0f}", f"{r['tokens'] / r['seconds']:.0f}", f"{r['bpb']:.4f}",
                     f"{b['moe_load_max']:.2f}x even" if b else "-",
                     f"{min(loads) * experts:.2f}x even" if loads else "-",
                     f"{b['moe_router_entropy']:.3f} nats" if b else "-"))
    print_table(header, rows)
    better = results["moe"]["bpb"] < results["dense"]["bpb"]
    print(f"target: MoE held-out bits/byte below dense at equal training time -> {'met' if better else 'MISSED'}")
    print(json.dumps({name: {k: v for k, v in r.items() if k != "model_dir"} for name, r in results.items()},
                     default=float))


# --- decoding -------------------------------------------------------------------------------------------------

def _bytes_per_decode_token(model, ids: torch.Tensor) -> int:
    """Weight bytes the eager model reads for one new token: every matrix-holding module it calls (linears, an
    expert's only when the router chose it, the routers), one embedding row."""
    read = []
    hooks = [m.register_forward_hook(lambda m, args, out: read.append(m.weight.numel() * m.weight.element_size()))
             for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
             and m is not model.embed_tokens]
    cache = StaticKVCache.for_model(model, 1, ids.shape[1] + 1)
    with torch.inference_mode():
        model(ids, kv_cache=cache)
        read.clear()
        model(ids[:, -1:], position_ids=torch.tensor([[ids.shape[1]]]), kv_cache=cache)
    for h in hooks:
        h.remove()
    row = model.embed_tokens.weight.shape[1] * model.embed_tokens.weight.element_size()
    return sum(read) + row


def _decode_row(label: str, model_dir: Path, new_tokens: int, repeats: int) -> tuple[str, ...]:
    import transformers  # the reference, benchmark-only

    reference = transformers.MixtralForCausalLM.from_pretrained(model_dir).eval()
    plain = load_hf(model_dir).eval()
    fast = use_skinny_linears_(load_hf(model_dir).eval())
    ids = torch.randint(0, plain.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))

    def theirs(n):
        with torch.inference_mode():
            return reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def ours(model):
        return lambda n: generate(model, ids, GenerationConfig(max_new_tokens=n, eos_token_id=[]))

    rates, outs = {}, {}
    for name, fn in (("hf", theirs), ("eager", ours(plain)), ("fast", ours(fast))):
        rates[name], outs[name] = decode_rate(fn, 1, new_tokens, repeats)
    read = _bytes_per_decode_token(plain, ids)
    everything = sum(p.numel() * p.element_size() for p in plain.parameters())
    same = torch.equal(outs["eager"], outs["hf"]) and torch.equal(outs["fast"], outs["hf"])
    return (label, f"{everything / 4e6:.1f}M", f"{read / 1e6:.1f}", f"{100 * read / everything:.0f}%",
            f"{rates['hf']:.1f}", f"{rates['eager']:.1f}", f"{rates['fast']:.1f}",
            f"{rates['fast'] / rates['hf']:.2f}x", "yes" if same else "NO")


def _random_mixtral_row(args, tmp: Path) -> tuple[str, ...]:
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=4096, hidden_size=args.decode_dim,
                                        intermediate_size=args.decode_expert_dim,
                                        num_hidden_layers=args.decode_layers, num_attention_heads=8,
                                        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                                        max_position_embeddings=1024)
    directory = tmp / "random-mixtral"
    transformers.MixtralForCausalLM(config).save_pretrained(directory)
    label = f"random Mixtral {args.decode_layers}x{args.decode_dim}, 8x{args.decode_expert_dim} experts"
    return _decode_row(label, directory, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
