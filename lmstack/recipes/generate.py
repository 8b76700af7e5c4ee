"""`lmstack generate`: continue a prompt with a Hugging Face-format checkpoint."""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.config import field
from lmstack.errors import ConfigError
from lmstack.generate import GenerationConfig, generate, stream
from lmstack.models import load_hf
from lmstack.nn.skinny_linear import use_skinny_linears_
from lmstack.tokenizers import TokenizerError, load_tokenizer


@dataclass
class GenerateJobConfig:
    """Generate text from a checkpoint: greedy, sampling (temperature / top-k / top-p) or beam search."""

    model: Path = field(help="checkpoint directory (config.json + *.safetensors)")
    prompt: str | None = field(None, help="prompt text, encoded with the tokenizer in the model directory")
    prompt_ids: str | None = field(None, help="prompt as token ids, e.g. '464 2068 7586'")
    max_new_tokens: int = field(50, help="tokens to generate")
    do_sample: bool | None = field(None, help="sample instead of greedy (default: on when temperature, top-k or "
                                              "top-p is given)")
    temperature: float | None = field(None, help="sampling temperature")
    top_k: int | None = field(None, help="sample among the k most likely tokens")
    top_p: float | None = field(None, help="sample from the smallest set of tokens with this much probability")
    num_beams: int = field(1, help="beam search with this many beams")
    repetition_penalty: float = field(1.0, help=">1 discourages repeating tokens")
    seed: int | None = field(None, help="random seed for sampling")
    stream: bool = field(False, help="print tokens as they are produced")
    fast_kernels: bool = field(True, help="use lmstack's memory-bandwidth-bound CPU decoding kernel (compiled once, "
                                          "about 30 s on first use)")


def to_generation_config(cfg: GenerateJobConfig) -> GenerationConfig:
    """The decoding options the flags ask for (sampling switches on when a sampling knob is given)."""
    sampling_knobs = (cfg.temperature, cfg.top_k, cfg.top_p)
    do_sample = cfg.do_sample if cfg.do_sample is not None else any(k is not None for k in sampling_knobs)
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=do_sample,
        temperature=1.0 if cfg.temperature is None else cfg.temperature,
        top_k=0 if cfg.top_k is None else cfg.top_k, top_p=1.0 if cfg.top_p is None else cfg.top_p,
        num_beams=cfg.num_beams, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)


def prompt_tensor(cfg: GenerateJobConfig, tokenizer) -> torch.Tensor:
    """(1, T) prompt ids from --prompt (through the tokenizer) or --prompt-ids."""
    if (cfg.prompt is None) == (cfg.prompt_ids is None):
        raise ConfigError("give exactly one of --prompt and --prompt-ids")
    if cfg.prompt is not None:
        if tokenizer is None:
            raise ConfigError(f"--prompt needs a tokenizer (tokenizer.json, or vocab.json + merges.txt) in "
                              f"{cfg.model}; pass token ids with --prompt-ids instead")
        return torch.tensor([tokenizer.encode(cfg.prompt)], dtype=torch.long)
    try:
        ids = [int(token) for token in cfg.prompt_ids.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--prompt-ids must be integers separated by spaces, got {cfg.prompt_ids!r}") from None
    return torch.tensor([ids], dtype=torch.long)


def find_tokenizer(directory: Path):
    """The tokenizer stored beside the checkpoint, or None if there is none."""
    try:
        return load_tokenizer(directory)
    except TokenizerError as error:
        if "no tokenizer.json" in str(error):
            return None
        raise ConfigError(str(error)) from None


def run(cfg: GenerateJobConfig) -> torch.Tensor:
    model = load_hf(cfg.model)
    tokenizer = find_tokenizer(cfg.model)
    ids = prompt_tensor(cfg, tokenizer)
    vocab = model.config.vocab_size
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ConfigError(f"prompt token ids must lie in [0, {vocab}) for this model")
    if cfg.fast_kernels and next(model.parameters()).device.type == "cpu":
        use_skinny_linears_(model)
    config = to_generation_config(cfg)
    if cfg.stream:
        return _stream(model, ids, config, tokenizer)
    out = generate(model, ids, config)
    new = out[0, ids.shape[1]:].tolist()
    print(tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new)))
    sys.stdout.flush()
    return out


def _stream(model, ids: torch.Tensor, config: GenerationConfig, tokenizer) -> torch.Tensor:
    """Print text (or ids without a tokenizer) as it is produced."""
    if tokenizer is not None:
        for delta in stream(model, ids, config, tokenizer=tokenizer):
            print(delta, end="", flush=True)
        print()
        return ids
    new = []
    for tokens in stream(model, ids, config):
        new.append(int(tokens[0]))
        print(new[-1], end=" ", flush=True)
    print()
    return torch.tensor([ids[0].tolist() + new])
