"""GenerationConfig: the decoding options, with the field names and defaults users know from transformers."""

from dataclasses import dataclass
from typing import Literal

from lmstack.errors import ConfigError


@dataclass
class GenerationConfig:
    """How to continue a prompt.

    Greedy by default. ``do_sample`` turns on sampling, shaped by ``temperature``, ``top_k`` and ``top_p``
    (top_k defaults to 50 when sampling, as in transformers). ``num_beams > 1`` runs beam search
    (or beam sampling with ``do_sample``), scoring finished beams by log-probability / length**length_penalty.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0  # end-of-sequence tokens are suppressed until this many were generated
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50  # 0 or None disables; only used when sampling
    top_p: float = 1.0  # nucleus mass; 1.0 disables; only used when sampling
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log p / length**length_penalty
    early_stopping: bool | Literal["never"] = False  # beam search: True stops once num_beams are finished
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already in the row (>1 discourages repeats)
    eos_token_id: int | list[int] | None = None  # None: the model config's; [] for no end-of-sequence token
    pad_token_id: int | None = None  # default: the model config's, else the first eos token
    stop_strings: str | list[str] | None = None  # stop a row once its new text contains one (needs a tokenizer)
    seed: int | None = None  # seeds the sampler's own generator: same seed, same tokens

    def validate(self) -> None:
        """Raise ConfigError naming the first option that is out of range or inconsistent."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_new_tokens={self.min_new_tokens} must be between 0 and max_new_tokens="
                              f"{self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 when sampling (use do_sample=False "
                              "for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 or None disables it)")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ConfigError(f"num_beams={self.num_beams!r} must be an integer >= 1")
        if self.num_return_sequences < 1:
            raise ConfigError(f"num_return_sequences={self.num_return_sequences} must be >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(f"num_return_sequences={self.num_return_sequences} cannot exceed num_beams="
                              f"{self.num_beams} in beam search")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ConfigError("greedy decoding returns one sequence per prompt; set do_sample=True or num_beams > 1 "
                              f"for num_return_sequences={self.num_return_sequences}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed={self.seed} must be in [0, 2**64)")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")

    def eos_ids(self) -> list[int]:
        """The end-of-sequence ids as a list (empty when none)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def stop_list(self) -> list[str]:
        if not self.stop_strings:
            return []
        return [self.stop_strings] if isinstance(self.stop_strings, str) else list(self.stop_strings)
