"""The decoding flags `lmstack generate` and `lmstack chat` share, and how they become a GenerationConfig."""

from dataclasses import dataclass

from lmstack.config import check_seed, field
from lmstack.errors import ConfigError
from lmstack.generate import GenerationConfig
from lmstack.kernels import use_skinny_linears_


@dataclass(kw_only=True)
class SamplingOptions:
    """Decoding flags (the fields of both jobs' configs)."""

    max_new_tokens: int = field(50, help="tokens to generate")
    do_sample: bool | None = field(None, help="sample instead of greedy (default: on when temperature, top-k or "
                                              "top-p is given)")
    temperature: float | None = field(None, help="sampling temperature")
    top_k: int | None = field(None, help="sample among the k most likely tokens")
    top_p: float | None = field(None, help="sample from the smallest set of tokens with this much probability")
    repetition_penalty: float = field(1.0, help=">1 discourages repeating tokens")
    seed: int | None = field(None, help="random seed for sampling")
    show_special: bool = field(False, help="print special tokens (<|im_end|>, ...) instead of hiding them")
    fast_kernels: bool = field(True, help="use lmstack's memory-bandwidth-bound CPU decoding kernels (compiled "
                                          "once per machine on first use, about 2 minutes)")

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


def to_generation_config(cfg: SamplingOptions, *, num_beams: int = 1,
                         eos_token_id: list[int] | None = None) -> GenerationConfig:
    """The decoding options the flags ask for (sampling switches on when a sampling knob is given)."""
    sampling_knobs = (cfg.temperature, cfg.top_k, cfg.top_p)
    do_sample = cfg.do_sample if cfg.do_sample is not None else any(k is not None for k in sampling_knobs)
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=do_sample,
        temperature=1.0 if cfg.temperature is None else cfg.temperature,
        top_k=0 if cfg.top_k is None else cfg.top_k, top_p=1.0 if cfg.top_p is None else cfg.top_p,
        num_beams=num_beams, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
        eos_token_id=eos_token_id or None)


def prepare_for_decoding(model, cfg: SamplingOptions):
    """The model with the CPU decoding kernels swapped in when asked for and useful (CPU weights)."""
    if cfg.fast_kernels and next(model.parameters()).device.type == "cpu":
        use_skinny_linears_(model)
    return model
