"""Serving SmolLM2-135M-Instruct to 1, 8 and 32 concurrent streaming clients: `lmstack serve` (fp32, and
int8 weights with int8 activations) vs transformers `generate` serving the same requests one by one, and
llama.cpp's server (llama-cpp-python[server], F32 and Q8_0 files written by `lmstack convert`) where installed.

Every request: a --prompt-tokens-token Shakespeare prompt, --new-tokens new tokens (end-of-sequence tokens
banned through logit_bias, so every reply has the same length), greedy, streamed. All requests of a level
are sent at once (clients x --requests-per-client, each client sending its next when its last ends).
Per level: throughput (streamed tokens / wall time), tokens per reply (a check that no reply was cut
short), p50 / p99 time to first token, p50 / p99 inter-token latency (gaps between streamed chunks).
Servers run in their own process with 2 threads; the clients are asyncio in this one. transformers serves
one request at a time in this process.

    python benchmarks/serve.py [--clients 1 8 32] [--new-tokens 128] [--prompt-tokens 128]

Targets at 32 clients: >= 8x the sequential transformers throughput, >= 1.5x llama.cpp's server, and p99
inter-token latency <= 4x that at 1 client.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from table import print_table

from lmstack.checkpoints.model_files import open_model
from lmstack.data import shakespeare_files
from lmstack.recipes.bundled import resolve_model_dir

THREADS = 2


def _prompts(tokenizer, n: int, length: int) -> list[str]:
    """n distinct Shakespeare passages of about ``length`` tokens (decoded windows of the text)."""
    ids = tokenizer.encode(" ".join(p.read_text(encoding="utf-8") for p in shakespeare_files()[:3]),
                           add_special_tokens=False)
    return [tokenizer.decode(ids[i * length:(i + 1) * length]) for i in range(1, n + 1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(THREADS))}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited: {process.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise RuntimeError(f"{command[:4]} did not start")
        time.sleep(0.5)


async def _one(client: httpx.AsyncClient, prompt: str, new_tokens: int, ban: dict) -> dict:
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True, "logit_bias": ban}
    start = time.perf_counter()
    arrivals = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals}


async def _level(url: str, prompts: list[str], clients: int, new_tokens: int, ban: dict) -> list[dict]:
    queue = list(prompts)
    results = []

    async def client_loop(client):
        while queue:
            results.append(await _one(client, queue.pop(0), new_tokens, ban))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results


def _summary(results: list[dict], new_tokens: int, wall: float) -> dict:
    """Throughput counts the streamed chunks that carried text (one per token; a server that holds back part
    of a character sends fewer), so a reply cut short is not counted as complete."""
    ttft = sorted(r["arrivals"][0] - r["start"] for r in results if r["arrivals"])
    gaps = sorted(b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:]))
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    chunks = sum(len(r["arrivals"]) for r in results)
    return {"tok/s": chunks / wall, "per request": chunks / len(results), "ttft50": pct(ttft, 0.5),
            "ttft99": pct(ttft, 0.99), "itl50": pct(gaps, 0.5), "itl99": pct(gaps, 0.99)}


def _serve_http(name: str, command: list[str], port: int, levels, prompts, new_tokens, ban) -> dict:
    process = _start(command, port)
    out = {}
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_level(url, prompts[:2], 2, 4, ban))  # warm-up
        for clients, n in levels:
            start = time.perf_counter()
            results = asyncio.run(_level(url, prompts[:n], clients, new_tokens, ban))
            out[clients] = _summary(results, new_tokens, time.perf_counter() - start)
            print(f"  {name} at {clients} clients: {out[clients]['tok/s']:.1f} tok/s", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return out


def _transformers(directory: Path, tokenizer, levels, prompts, new_tokens, ban_ids) -> dict:
    """transformers generate, one request at a time, in arrival order (all of a level arrive at t = 0)."""
    import transformers

    torch.set_num_threads(THREADS)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    class Clock(transformers.generation.BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call is the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def serve(prompt):
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        clock = Clock()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                       suppress_tokens=ban_ids, pad_token_id=0)
        return clock.times  # one per generated token

    serve(prompts[0])  # warm-up
    out = {}
    for clients, n in levels:
        # The first `clients` requests arrive at once; each client sends its next when its last one ends. The
        # server takes them first come, first served.
        start = time.perf_counter()
        arrivals, results = [start] * min(clients, n), []
        for p in prompts[:n]:
            sent = arrivals.pop(0)
            results.append({"start": sent, "arrivals": serve(p)})
            if len(arrivals) + len(results) < n:
                arrivals.append(time.perf_counter())
        out[clients] = _summary(results, new_tokens, time.perf_counter() - start)
        print(f"  transformers at {clients} clients: {out[clients]['tok/s']:.1f} tok/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=1, help="(at 1 client: at least 4 requests)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's server even if installed")
    args = parser.parse_args()

    bundled = resolve_model_dir("smollm2-135m-instruct")
    files = open_model(bundled)
    levels = [(c, max(c * args.requests_per_client, 4 if c == 1 else 0)) for c in args.clients]
    prompts = _prompts(files.tokenizer, max(n for _, n in levels), args.prompt_tokens)
    ban = {str(i): -100 for i in files.stop_ids}
    work = Path(tempfile.mkdtemp(prefix="lmstack-serve-bench-"))
    from lmstack.checkpoints import save_hf

    directory = save_hf(files.model, work / "smollm2")
    files.tokenizer.save(directory)
    lmstack_cli = [sys.executable, "-c", "import sys; from lmstack.cli import main; sys.exit(main(sys.argv[1:]))",
                   "serve", "--model", str(bundled), "--max-batch", "32", "--kv-blocks", "2048", "--log-level", "error"]
    rows = {}
    for name, extra in (("lmstack fp32", []), ("lmstack int8 dyn", ["--quantize", "int8", "--activations", "int8"])):
        port = _free_port()
        rows[name] = _serve_http(name, lmstack_cli + ["--port", str(port)] + extra, port, levels, prompts,
                                 args.new_tokens, ban)
    if not args.no_transformers:
        rows["transformers (one by one)"] = _transformers(directory, files.tokenizer, levels, prompts,
                                                          args.new_tokens, list(files.stop_ids))
    if args.no_llama_cpp:
        pass
    elif importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
        print("llama.cpp columns skipped: pip install 'llama-cpp-python[server]' (builds llama.cpp, 15-45 min)")
    else:
        from lmstack.checkpoints.gguf import read_gguf
        from lmstack.checkpoints.gguf_export import copy_tokenizer_metadata, save_gguf

        tokenizer_meta = copy_tokenizer_metadata(read_gguf(bundled).metadata)
        for kind in ("F32", "Q8_0"):
            path = save_gguf(files.model, work / f"smollm2.{kind.lower()}.gguf", kind, tokenizer_meta)
            port = _free_port()
            # interrupt_requests False: by default a new request cuts the running one short.
            command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
                       "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", "4096",
                       "--interrupt_requests", "False", "--verbose", "False"]
            rows[f"llama.cpp server {kind}"] = _serve_http(f"llama.cpp {kind}", command, port, levels, prompts,
                                                           args.new_tokens, ban)
    _report(rows, args.clients)


def _report(rows: dict, clients: list[int]) -> None:
    table = []
    for name, levels in rows.items():
        for c in clients:
            s = levels[c]
            table.append((name, str(c), f"{s['tok/s']:.1f}", f"{s['per request']:.0f}", f"{s['ttft50'] * 1000:.0f}",
                          f"{s['ttft99'] * 1000:.0f}", f"{s['itl50'] * 1000:.1f}", f"{s['itl99'] * 1000:.1f}"))
    print()
    print_table(("server", "clients", "tok/s", "tokens/reply", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                 "ITL p99 ms"), table)
    top = max(clients)
    ours = rows["lmstack fp32"]
    if "transformers (one by one)" in rows:  # (skipped with --no-transformers)
        print(f"\nlmstack fp32 at {top} clients vs transformers one by one: "
              f"{ours[top]['tok/s'] / rows['transformers (one by one)'][top]['tok/s']:.2f}x (target >= 8x)")
    for name in [n for n in rows if n.startswith("llama.cpp")]:
        for mine in ("lmstack fp32", "lmstack int8 dyn"):
            print(f"{mine} at {top} clients vs {name}: {rows[mine][top]['tok/s'] / rows[name][top]['tok/s']:.2f}x "
                  "(target >= 1.5x)")
    low = min(clients)
    print(f"lmstack fp32 p99 inter-token latency at {top} vs {low} clients: "
          f"{ours[top]['itl99'] / ours[low]['itl99']:.2f}x (target <= 4x)")


if __name__ == "__main__":
    main()
