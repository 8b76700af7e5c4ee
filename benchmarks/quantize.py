"""Quantized decoding on SmolLM2-135M-Instruct: lmstack fp32 / int8 / int4 / NF4 (weight-only, and int8 / int4
with dynamically quantized int8 activations: "dyn") vs transformers fp32 (and
llama.cpp where llama-cpp-python is installed), at 1 and 2 threads, in one interleaved run.

Per configuration and thread count: decode tokens/s at batch 1 and 8 (a --prompt-token prompt, --new-tokens
new; decode excludes the time to the first token), prompt tokens/s (--prefill tokens, one forward pass with
the LM head on the last position only, as generation runs a prompt and as llama.cpp does by default),
the weight bytes one decode step reads and the fraction of the bandwidth bound (bytes/token x tokens/s over
the read bandwidth measured in this run at that thread count). Each figure is the median of --rounds rounds;
a round runs every configuration once, so machine noise spreads over all of them.

    python benchmarks/quantize.py [--rounds 3] [--threads 1 2] [--new-tokens 128]

llama.cpp columns (optional): `pip install llama-cpp-python` (builds llama.cpp from source, 15-45 minutes
here). The benchmark runs the bundled Q4_1 file and Q8_0 / Q4_0 files it writes from the same weights with
`lmstack convert ... --type q8_0|q4_0`, with n_threads = the thread count; llama-cpp-python decodes one
sequence, so its batch-8 column is empty. Without it the columns are skipped with this hint.
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from generate import decode_rate, read_bandwidth
from table import print_table

from lmstack.checkpoints.model_files import open_model
from lmstack.compress import QuantizedLinear, quantize_
from lmstack.compress.files import save_quantized
from lmstack.compress.gguf_weights import load_gguf_quantized
from lmstack.generate import GenerationConfig, generate
from lmstack.kernels import use_skinny_linears_
from lmstack.recipes.bundled import resolve_model_dir

# column -> (scheme, group size, activations); int4's group is --group-size. "dyn": int8 activations too.
SCHEMES = {"fp32": None, "int8": ("int8", None, None), "int8-g128": ("int8", 128, None),
           "int8 dyn": ("int8", None, "int8"), "int4": ("int4", "G", None), "int4 dyn": ("int4", "G", "int8"),
           "nf4": ("nf4", None, None)}


def decode_bytes(model) -> int:
    """Bytes one decode step reads: every linear's stored tensors (a tied LM head: the whole shared table),
    the norms, and one row of the token embedding."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        tensors = module.tensors().values() if isinstance(module, QuantizedLinear) else []
        for t in [*tensors, *module.parameters(recurse=False)]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total + model.embed_tokens.embedding_dim * 4


def disk_bytes(model, scheme: str) -> int:
    """Bytes of the checkpoint directory ``save_hf`` (fp32) or ``save_quantized`` writes."""
    with tempfile.TemporaryDirectory() as directory:
        if scheme == "fp32":
            from lmstack.checkpoints import save_hf

            save_hf(model, directory)
        else:
            save_quantized(model, directory)
        return sum(f.stat().st_size for f in Path(directory).iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group (32 = llama.cpp's Q4 block)")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    files = open_model(resolve_model_dir("smollm2-135m-instruct"), hugepages=True)
    base = files.model
    models = {}
    for name, spec in SCHEMES.items():
        model = copy.deepcopy(base)
        if spec is not None:
            scheme, group, activations = spec
            quantize_(model, scheme, group_size=args.group_size if group == "G" else group, activations=activations)
        models[name] = use_skinny_linears_(model)
    gguf_files = _gguf_files(base)
    for kind, path in gguf_files.items():  # the files llama.cpp runs, kept quantized, with int8 activations
        models[f"{kind} dyn"] = use_skinny_linears_(load_gguf_quantized(path, activations="int8"))
    ours = list(models)
    reference = None
    if not args.no_transformers:
        import transformers

        with tempfile.TemporaryDirectory() as directory:
            from lmstack.checkpoints import save_hf

            save_hf(base, directory)
            reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    llama_files = _llama_cpp_files(gguf_files)

    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, 49152, (b, args.prompt_tokens), generator=gen) for b in (1, 8)}
    long_prompt = torch.randint(0, 49152, (1, args.prefill), generator=gen)
    names = ours + (["transformers"] if reference is not None else []) + list(llama_files)
    results = {(t, n, k): [] for t in args.threads for n in names for k in ("b1", "b8", "prefill")}
    bandwidth = {t: [] for t in args.threads}
    for round_ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            bandwidth[threads].append(read_bandwidth(0.5, repeats=3))
            for name in names:
                if name in llama_files:
                    b1, prefill = _llama_cpp_rates(llama_files[name], threads, prompts[1], long_prompt, args.new_tokens)
                    results[(threads, name, "b1")].append(b1)
                    results[(threads, name, "b8")].append(float("nan"))
                    results[(threads, name, "prefill")].append(prefill)
                    continue
                model = reference if name == "transformers" else models[name]
                for batch in (1, 8):
                    results[(threads, name, f"b{batch}")].append(
                        decode_rate(_runner(model, prompts[batch], name), batch, args.new_tokens, 1)[0])
                with torch.inference_mode():
                    start = time.perf_counter()
                    _prefill(model, long_prompt, name)
                    results[(threads, name, "prefill")].append(args.prefill / (time.perf_counter() - start))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    sizes = {name: gguf_files[name.removesuffix(" dyn")].stat().st_size if name not in SCHEMES
             else disk_bytes(models[name], name) for name in ours}
    step_bytes = {name: decode_bytes(models[name]) for name in ours}
    for name, path in llama_files.items():  # llama.cpp reads every tensor once (the tied output: the whole table)
        from lmstack.checkpoints.gguf import read_gguf

        sizes[name] = path.stat().st_size
        step_bytes[name] = sum(t.data.nbytes for t in read_gguf(path).tensors.values())
    print(f"SmolLM2-135M-Instruct (from the bundled GGUF, dequantised, then quantized: int4 group {args.group_size}; "
          f"Q8_0 / Q4_0 dyn: lmstack running llama.cpp's files, kept quantized, int8 activations per block of 32), "
          f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, prefill {args.prefill}; torch {torch.__version__}; "
          f"median of {args.rounds} interleaved rounds")
    for threads in args.threads:
        bw = statistics.median(bandwidth[threads])
        print(f"\n{threads} thread(s): read bandwidth {bw / 1e9:.1f} GB/s")
        hf = {k: statistics.median(results[(threads, "transformers", k)]) for k in ("b1", "b8", "prefill")} \
            if reference is not None else None
        rows = []
        for name in names:
            b1, b8, pre = (statistics.median(results[(threads, name, k)]) for k in ("b1", "b8", "prefill"))
            lm = name in ours or name in llama_files
            rows.append((f"lmstack {name}" if name in ours else name, f"{b1:.1f}", "-" if b8 != b8 else f"{b8:.1f}", f"{pre:.0f}",
                         f"{b1 / hf['b1']:.2f}x" if hf else "-", f"{b8 / hf['b8']:.2f}x" if hf and b8 == b8 else "-",
                         f"{sizes[name] / 2**20:.0f}" if lm else "-", f"{step_bytes[name] / 2**20:.0f}" if lm else "-",
                         f"{100 * step_bytes[name] * b1 / bw:.0f}%" if lm else "-"))
        print_table(("model", "decode b1 tok/s", "decode b8 tok/s", "prefill tok/s", "b1 vs HF", "b8 vs HF",
                     "disk MiB", "MiB/token", "b1 of bound"), rows)


def _gguf_files(base) -> dict[str, Path]:
    """Q8_0 and Q4_0 GGUF files of ``base`` written by ``lmstack convert``'s exporter, and the bundled Q4_1."""
    from lmstack.checkpoints.gguf import read_gguf
    from lmstack.checkpoints.gguf_export import copy_tokenizer_metadata, save_gguf

    bundled = resolve_model_dir("smollm2-135m-instruct")
    folder = Path(tempfile.mkdtemp(prefix="lmstack-bench-"))
    tokenizer = copy_tokenizer_metadata(read_gguf(bundled).metadata)
    files = {kind: save_gguf(base, folder / f"smollm2.{kind.lower()}.gguf", kind, tokenizer) for kind in ("Q8_0", "Q4_0")}
    return {**files, "Q4_1": bundled}


def _llama_cpp_files(gguf_files: dict[str, Path]) -> dict[str, Path]:
    """Column name -> GGUF file for llama.cpp (empty, with an install hint, without llama-cpp-python)."""
    try:
        import llama_cpp  # noqa: F401  (is it installed?)
    except ImportError:
        print("llama.cpp columns skipped: pip install llama-cpp-python (builds llama.cpp from source, 15-45 min)")
        return {}
    return {f"llama.cpp {kind}": path for kind, path in gguf_files.items()}


def _llama_cpp_rates(path: Path, threads: int, prompt: torch.Tensor, long_prompt: torch.Tensor,
                     new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s after the prompt, prompt tokens/s) with greedy decoding through llama-cpp-python."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                          n_batch=512, verbose=False)
    llm.eval(prompt[0].tolist())
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    decode = (new_tokens - 1) / (time.perf_counter() - start)
    llm.reset()
    start = time.perf_counter()
    llm.eval(long_prompt[0].tolist())
    prefill = long_prompt.shape[1] / (time.perf_counter() - start)
    del llm
    return decode, prefill


def _prefill(model, prompt, name):
    """What generation does with a prompt: every position through the blocks, the LM head on the last one
    only (lmstack's engine; transformers' logits_to_keep=1; llama.cpp's default, logits for the last token)."""
    if name == "transformers":
        return model(prompt, logits_to_keep=1).logits
    return model.lm_head(model.hidden_states(prompt)[:, -1])


def _runner(model, prompt, name):
    if name == "transformers":
        def run(n):
            with torch.inference_mode():
                return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return run
    return lambda n: generate(model, prompt, GenerationConfig(max_new_tokens=n, eos_token_id=[]))


if __name__ == "__main__":
    main()
