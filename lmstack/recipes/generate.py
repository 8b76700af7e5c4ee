"""`lmstack generate`: continue a prompt with a Hugging Face-format checkpoint or a GGUF file."""

import sys

import torch

from lmstack.errors import ConfigError
from lmstack.generate import GenerationConfig, generate, stream
from lmstack.recipes.sampling import open_for_decoding, to_generation_config
from lmstack.recipes.configs.generate import GenerateJobConfig


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


def run(cfg: GenerateJobConfig) -> torch.Tensor:
    files = open_for_decoding(cfg)
    model, tokenizer = files.model, files.tokenizer
    ids = prompt_tensor(cfg, tokenizer)
    vocab = model.config.vocab_size
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ConfigError(f"prompt token ids must lie in [0, {vocab}) for this model")
    config = to_generation_config(cfg, num_beams=cfg.num_beams, eos_token_id=files.stop_ids)
    if cfg.stream:
        return _stream(model, ids, config, tokenizer, cfg.show_special)
    out = generate(model, ids, config)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in files.stop_ids or cfg.show_special]
    print(tokenizer.decode(new, skip_special_tokens=not cfg.show_special) if tokenizer is not None
          else " ".join(map(str, new)))
    sys.stdout.flush()
    return out


def _stream(model, ids: torch.Tensor, config: GenerationConfig, tokenizer, show_special: bool) -> torch.Tensor:
    """Print text (or ids without a tokenizer) as it is produced."""
    if tokenizer is not None:
        for delta in stream(model, ids, config, tokenizer=tokenizer, skip_special_tokens=not show_special):
            print(delta, end="", flush=True)
        print()
        return ids
    new = []
    for tokens in stream(model, ids, config):
        new.append(int(tokens[0]))
        print(new[-1], end=" ", flush=True)
    print()
    return torch.tensor([ids[0].tolist() + new])
