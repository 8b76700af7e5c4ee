"""The decoding flags `lmstack generate` and `lmstack chat` share; ChatModelOptions adds the model to decode with
(a local --model or a running --server) for `lmstack rag ask` and `lmstack agent`."""

from dataclasses import dataclass
from pathlib import Path
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


@dataclass(kw_only=True)
class ChatModelOptions(SamplingOptions):
    """The chat model a job generates with: a model loaded here (--model) or a running server (--server)."""

    model: Path | None = field(None, help="chat model: checkpoint directory, .gguf file, or smollm2-135m-instruct "
                                          "(bundled); or --server")
    server: str | None = field(None, help="generate with a running `lmstack serve` (or any server with vLLM's "
                                          "/tokenize) at this URL, e.g. http://127.0.0.1:8000, instead of --model")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.model is None) == (self.server is None):
            raise ConfigError("give the chat model as --model PATH or --server URL (one of them)")
        if self.server is not None:
            local = [flag for flag, value in (("--top-k", self.top_k), ("--top-p", self.top_p), ("--seed", self.seed),
                                              ("--quantize", None if self.quantize == "none" else self.quantize),
                                              ("--repetition-penalty", None if self.repetition_penalty == 1.0
                                               else self.repetition_penalty)) if value is not None]
            if local:
                raise ConfigError(f"{', '.join(local)} set a model loaded here; with --server only --temperature is "
                                  "sent (set the rest when starting the server)")
