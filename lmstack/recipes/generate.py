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


@dataclass
class GenerateJobConfig:
    """Generate text from a checkpoint: greedy, sampling (temperature / top-k / top-p) or beam search."""

    model: Path = field(help="checkpoint directory (config.json + *.safetensors)")
    prompt: str | None = field(None, help="prompt text (needs a tokenizer in the model directory)")
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


def prompt_tensor(cfg: GenerateJobConfig) -> torch.Tensor:
    """(1, T) prompt ids from --prompt-ids (text prompts need the tokenizers issue)."""
    if (cfg.prompt is None) == (cfg.prompt_ids is None):
        raise ConfigError("give exactly one of --prompt and --prompt-ids")
    if cfg.prompt is not None:
        raise ConfigError(f"--prompt needs a tokenizer for {cfg.model}, which lmstack cannot read yet; "
                          "pass the prompt as --prompt-ids")
    try:
        ids = [int(token) for token in cfg.prompt_ids.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--prompt-ids must be integers separated by spaces, got {cfg.prompt_ids!r}") from None
    return torch.tensor([ids], dtype=torch.long)


def run(cfg: GenerateJobConfig) -> torch.Tensor:
    model = load_hf(cfg.model)
    ids = prompt_tensor(cfg)
    if cfg.fast_kernels and next(model.parameters()).device.type == "cpu":
        use_skinny_linears_(model)
    vocab = model.config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ConfigError(f"--prompt-ids must lie in [0, {vocab}) for this model")
    config = to_generation_config(cfg)
    if cfg.stream:
        new = []
        for tokens in stream(model, ids, config):
            new.append(int(tokens[0]))
            print(new[-1], end=" ", flush=True)
        print()
        return torch.tensor([ids[0].tolist() + new])
    out = generate(model, ids, config)
    print(" ".join(str(t) for t in out[0, ids.shape[1]:].tolist()))
    sys.stdout.flush()
    return out
