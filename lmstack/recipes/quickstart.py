"""`lmstack quickstart` (what `make quickstart` runs): the main job, end to end on 2 CPU cores in ~10 minutes.

1. trains a byte-level BPE tokenizer (4096 tokens) on the Shakespeare corpus, minus 4 held-out plays;
2. pretrains a small Llama-style GPT (4 layers, width 192) on it with ``lmstack pretrain``'s recipe, evaluating
   held-out loss and bits per byte, checkpointing, and plotting the loss curve;
3. exports a Hugging Face-format directory with its tokenizer, and prints samples from greedy, top-k,
   top-p and beam-search decoding.

The settings are ``configs/pretrain/shakespeare.yaml`` (kept equal by a test); every key can be
overridden like ``lmstack pretrain``'s (``--train.max_steps 100``). Running it again continues the run in
--out (or, once finished, only prints the samples).
"""

import dataclasses
from pathlib import Path

import torch

from lmstack.checkpoints.train_state import latest_checkpoint
from lmstack.generate import GenerationConfig, generate
from lmstack.checkpoints import load_hf
from lmstack.recipes import pretrain
from lmstack.tokenizers import load_tokenizer
from lmstack.recipes.configs.quickstart import QuickstartConfig


def run(cfg: QuickstartConfig) -> Path:
    """Pretrain (or continue), then sample with every decoding strategy; returns the exported model directory."""
    if not cfg.resume and latest_checkpoint(cfg.out) is not None:
        print(f"continuing the run in {cfg.out} (delete it to start over)")
        cfg = dataclasses.replace(cfg, resume=True)
    print("== 1. Tokenizer and pretraining ==")
    result = pretrain.run(cfg)
    print("\n== 2. Samples from the exported model ==")
    _samples(result.model_dir, cfg)
    bpb = result.final.get("eval_bpb")
    print(f"\nheld-out bits per byte: {bpb:.3f}" if bpb is not None else "\n(no held-out split: no bits per byte)")
    print(f"model + tokenizer (Hugging Face format): {result.model_dir}\nloss curve: {result.out / 'loss.png'}\n"
          f"try: lmstack generate --model {result.model_dir} --prompt \"{cfg.prompt.strip()}\" --top-p 0.9 --stream")
    return result.model_dir


def _samples(model_dir: Path, cfg: QuickstartConfig) -> None:
    model, tokenizer = load_hf(model_dir), load_tokenizer(model_dir)
    prompt = torch.tensor([tokenizer.encode(cfg.prompt, add_special_tokens=False)])
    n = cfg.new_tokens
    strategies = {
        "greedy": GenerationConfig(max_new_tokens=n),
        "top-k 40, temperature 0.8": GenerationConfig(max_new_tokens=n, do_sample=True, top_k=40, temperature=0.8,
                                                      seed=cfg.seed),
        "top-p 0.9": GenerationConfig(max_new_tokens=n, do_sample=True, top_k=0, top_p=0.9, seed=cfg.seed),
        "beam search, 4 beams": GenerationConfig(max_new_tokens=n, num_beams=4, repetition_penalty=1.2),
    }
    for name, config in strategies.items():
        ids = generate(model, prompt, config)[0].tolist()
        print(f"--- {name} ---\n{tokenizer.decode(ids, skip_special_tokens=True)}\n")
