"""Decode speed: lmstack vs transformers' generate on the same GPT-2-124M weights, with the bandwidth bound.

Three columns of decode speed: transformers; lmstack in eager PyTorch; lmstack with the CPU kernels
(``use_skinny_linears_``: each decode step is one fused C++ call, see lmstack/kernels/fused_step.py).

For each batch size: greedy decoding of 128 new tokens after a 128-token prompt (random weights, fp32).
Decode tokens/s = batch * 127 / (time of the full generation - time to the first new token), so prompt
processing is not counted; each figure is the median of --repeats runs. The bound is the weight bytes one
decode step must read (every matrix once; one row of each embedding table, the tied LM head in full)
divided by the machine's read bandwidth, measured in the same run by summing a 1 GiB tensor, both in ordinary
and in huge-page memory (the faster is used, so the bound is the stricter one).

    python benchmarks/generate.py [--repeats 3] [--batches 1 8] [--new-tokens 128]
"""

import argparse
import statistics
import tempfile
import time

import torch
from table import print_table

from lmstack.generate import GenerationConfig, generate
from lmstack.checkpoints import load_hf
from lmstack.kernels import load_cpu_kernels, move_to_hugepages_, use_skinny_linears_


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second for a streaming read: best of ``repeats``, the faster of ordinary and huge-page memory."""
    plain = torch.ones(int(gib * 2**30) // 4)
    huge = torch.nn.Parameter(torch.ones(plain.numel()), requires_grad=False)
    move_to_hugepages_([huge])
    rates = []
    for x in (plain, huge.data):
        x.sum()
        rates.append(x.numel() * 4 / min(_timed(x.sum) for _ in range(repeats)))
    return max(rates)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_bytes_per_token(model) -> int:
    """Weights read per decode step: all parameters, except that each embedding table is read one row at a
    time (the tied LM head still reads the whole token table)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    positions = model.embed_positions.weight if model.embed_positions is not None else None
    if positions is not None:
        total -= positions.numel() * positions.element_size() - positions.shape[1] * positions.element_size()
    return total


def decode_rate(run, batch: int, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """(decode tokens/s median, last output) for ``run(max_new_tokens) -> ids``."""
    run(4)  # warm-up
    rates, out = [], None
    for _ in range(repeats):
        first = _timed(lambda: run(1))
        start = time.perf_counter()
        out = run(new_tokens)
        total = time.perf_counter() - start
        rates.append(batch * (new_tokens - 1) / (total - first))
    return statistics.median(rates), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-layer", type=int, default=12, help="smaller values make a quick smoke run")
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth probe")
    args = parser.parse_args()
    import transformers  # the reference, benchmark-only

    torch.manual_seed(0)
    shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        plain = load_hf(directory)
        fast = use_skinny_linears_(load_hf(directory))
    bandwidth = read_bandwidth(args.bandwidth_gib)
    bytes_per_token = decode_bytes_per_token(plain)
    size = sum(p.numel() for p in plain.parameters()) / 1e6
    print(f"GPT-2 shape ({size:.0f}M parameters), fp32, prompt {args.prompt}, {args.new_tokens} new tokens, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads; CPU kernels "
          f"{'built' if load_cpu_kernels() else 'UNAVAILABLE (falls back to F.linear)'}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {bytes_per_token / 1e6:.1f} MB of weights per decode step")
    header = ("batch", "transformers", "lmstack torch", "lmstack kernels", "vs transformers", "bound tok/s",
              "of bound", "same tokens")
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, 50257, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))

        def theirs(n):
            with torch.inference_mode():
                return reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        def ours(model):
            return lambda n: generate(model, ids, GenerationConfig(max_new_tokens=n, eos_token_id=[]))

        hf_rate, hf_out = decode_rate(theirs, batch, args.new_tokens, args.repeats)
        plain_rate, plain_out = decode_rate(ours(plain), batch, args.new_tokens, args.repeats)
        fast_rate, fast_out = decode_rate(ours(fast), batch, args.new_tokens, args.repeats)
        bound = batch * bandwidth / bytes_per_token
        same = torch.equal(plain_out, hf_out) and torch.equal(fast_out, hf_out)
        rows.append((str(batch), f"{hf_rate:.1f}", f"{plain_rate:.1f}", f"{fast_rate:.1f}", f"{fast_rate / hf_rate:.2f}x",
                     f"{bound:.1f}", f"{100 * fast_rate / bound:.0f}%", "yes" if same else "NO"))
    print_table(header, rows)
    print("decode tokens/s (median); 'of bound' = lmstack kernels / (batch x bandwidth / bytes per step)")


if __name__ == "__main__":
    main()
