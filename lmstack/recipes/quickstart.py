"""`lmstack quickstart`: a short tour of what lmstack does today.

Builds a model from a named preset, prints its parameter table, saves it as a sharded Hugging Face
checkpoint, loads it back, checks the logits are identical, times a forward pass with each attention
backend, and decodes with every strategy on the KV cache. (Once pretraining and tokenizers land,
quickstart trains a small GPT on Shakespeare and prints real text instead of token ids.)
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.config import field
from lmstack.generate import GenerationConfig, generate
from lmstack.models import build_model, get_preset, load_hf, save_hf
from lmstack.models.summary import format_parameter_table
from lmstack.nn import set_attention_backend
from lmstack.nn.skinny_linear import use_skinny_linears_
from lmstack.recipes.info import describe


@dataclass
class QuickstartConfig:
    """A tour: build a preset, save and reload it in Hugging Face format, compare logits, time and decode."""

    preset: str = field("gpt2", help="model preset to build (see lmstack.models.preset_names())")
    out: Path = field(Path("runs/quickstart"), help="where the checkpoint is written")
    seq_len: int = field(256, help="tokens in the timed forward pass")
    seed: int = field(0, help="random seed")


def run(cfg: QuickstartConfig) -> Path:
    config = get_preset(cfg.preset)
    print(f"1. Building {cfg.preset!r} from its preset (random init, fp32)")
    model = build_model(config, seed=cfg.seed).eval()
    print(format_parameter_table(model), "\n")

    directory = cfg.out / cfg.preset
    print(f"2. Saving in Hugging Face format to {directory} (sharded at 200MB)")
    save_hf(model, directory, max_shard_size="200MB")
    print(describe(directory).split("\n\n")[0], "\n")

    print("3. Loading it back and comparing logits")
    reloaded = load_hf(directory)
    ids = torch.randint(0, config.vocab_size, (1, min(cfg.seq_len, config.max_seq_len)),
                        generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        diff = (model(ids) - reloaded(ids)).abs().max().item()
    print(f"   max |logits difference| = {diff:.1e} ({'identical' if diff == 0 else 'DIFFERENT'})\n")

    print(f"4. One forward pass over {ids.shape[1]} tokens with each attention backend")
    for backend in ("sdpa", "flash", "eager"):
        set_attention_backend(reloaded, backend)
        with torch.no_grad():
            reloaded(ids)  # warm-up
            start = time.perf_counter()
            reloaded(ids)
        print(f"   {backend:<6} {1000 * (time.perf_counter() - start):7.1f} ms")
    set_attention_backend(reloaded, "sdpa")
    _decode_tour(reloaded, ids[:, :16], cfg.seed)
    print(f"\nDone. Inspect the checkpoint with: lmstack info {directory}")
    return directory


def _decode_tour(model, prompt: torch.Tensor, seed: int) -> None:
    """Step 5: every decoding strategy on the same prompt, then decode speed with the CPU kernel."""
    print("\n5. Decoding 24 tokens after a 16-token prompt (random weights, so the ids are noise)")
    strategies = {
        "greedy": GenerationConfig(max_new_tokens=24, eos_token_id=[]),
        "top-k 40, T 0.8": GenerationConfig(max_new_tokens=24, do_sample=True, top_k=40, temperature=0.8, seed=seed,
                                            eos_token_id=[]),
        "top-p 0.9": GenerationConfig(max_new_tokens=24, do_sample=True, top_k=0, top_p=0.9, seed=seed,
                                      eos_token_id=[]),
        "beam x4": GenerationConfig(max_new_tokens=24, num_beams=4, eos_token_id=[]),
    }
    for name, config in strategies.items():
        new = generate(model, prompt, config)[0, prompt.shape[1]:].tolist()
        print(f"   {name:<16} {' '.join(map(str, new[:12]))} ...")
    greedy = strategies["greedy"]
    rate = _decode_rate(model, prompt, greedy)
    if model.embed_tokens.weight.device.type == "cpu":
        print("   compiling lmstack's CPU decoding kernel (first use only)...")
        use_skinny_linears_(model)
        print(f"   decode speed: {rate:.1f} tokens/s with torch matmuls, "
              f"{_decode_rate(model, prompt, greedy):.1f} tokens/s with the kernel")


def _decode_rate(model, prompt: torch.Tensor, config: GenerationConfig) -> float:
    generate(model, prompt, GenerationConfig(max_new_tokens=2, eos_token_id=[]))  # warm-up
    start = time.perf_counter()
    first = generate(model, prompt, GenerationConfig(max_new_tokens=1, eos_token_id=[]))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(model, prompt, config)
    return (out.shape[1] - first.shape[1]) / max(time.perf_counter() - start - prefill, 1e-9)
