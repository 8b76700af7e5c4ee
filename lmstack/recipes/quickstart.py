"""`lmstack quickstart`: a short tour of what lmstack does today.

Builds a model from a named preset, prints its parameter table, saves it as a sharded Hugging Face
checkpoint, loads it back, checks the logits are identical, and times a forward pass with each
attention backend. (Once pretraining lands, quickstart trains a small GPT on Shakespeare instead.)
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.config import field
from lmstack.models import build_model, get_preset, load_hf, save_hf
from lmstack.models.summary import format_parameter_table
from lmstack.nn import set_attention_backend
from lmstack.recipes.info import describe


@dataclass
class QuickstartConfig:
    """A tour: build a preset, save and reload it in Hugging Face format, compare logits, time a forward."""

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
    print(f"\nDone. Inspect the checkpoint with: lmstack info {directory}")
    return directory
