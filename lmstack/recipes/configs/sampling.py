"""The decoding flags `lmstack generate` and `lmstack chat` share."""

from dataclasses import dataclass
from typing import Literal

from lmstack.config import check_seed, field
from lmstack.errors import ConfigError


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
    quantize: Literal["none", "int8", "int4", "nf4", "gguf"] = field(
        "none", help="quantize the weights after loading (round-to-nearest; lmstack quantize has GPTQ/AWQ); gguf: "
        "keep a GGUF file's Q8_0/Q4_0/Q4_1 tensors as they are (no fp32 copy)")
    group_size: int | None = field(None, help="inputs per scale when quantizing: 32, 64, 128 or 256 (default: "
                                              "128 for int4, per row for int8)")
    activations: Literal["none", "int8"] = field("none", help="with --quantize int8 / int4 / gguf: round each "
                                                 "layer's input to int8 too (dynamic quantization: integer "
                                                 "products, faster decoding)")
    fast_kernels: bool = field(True, help="use lmstack's memory-bandwidth-bound CPU decoding kernels (compiled "
                                          "once per machine on first use, about 2 minutes)")

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.activations != "none" and self.quantize not in ("int8", "int4", "gguf"):
            raise ConfigError(f"--activations {self.activations} needs --quantize int8, int4 or gguf "
                              f"(got --quantize {self.quantize})")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
