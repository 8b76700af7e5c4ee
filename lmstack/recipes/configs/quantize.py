"""What `lmstack quantize` takes."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import check_seed, field


@dataclass
class QuantizeConfig:
    """Quantize a checkpoint's linear layers (int8, int4, NF4, or int4 chosen by GPTQ / AWQ) and save it."""

    source: Path = field(help="checkpoint directory, .gguf file, or a bundled name (smollm2-135m-instruct)",
                         positional=True)
    output: Path = field(help="output directory (quantized safetensors + config.json + tokenizer)", positional=True)
    scheme: Literal["int8", "int4", "nf4", "gptq", "awq"] = field("int8", help="int8 per row; int4 per group "
                                                                  "(round-to-nearest); nf4 (QLoRA's); gptq / awq: "
                                                                  "int4 chosen from calibration text")
    group_size: int | None = field(None, help="inputs per scale: 32, 64, 128 or 256 (default: 128 for int4 / "
                                              "gptq / awq; one scale per row for int8)")
    activations: Literal["none", "int8"] = field("none", help="int8: the saved model also rounds each layer's "
                                                 "input to int8 (dynamic quantization; int8 / int4 / gptq / awq)")
    embedding: bool = field(False, help="quantize the token embedding too (int4 for gptq / awq); a tied LM head "
                                         "then shares its table, as llama.cpp's files do")
    lm_head: bool = field(True, help="quantize the LM head too (a tied head gets its own quantized copy)")
    calibration: list[str] = field(default_factory=lambda: ["shakespeare"], help="gptq / awq: calibration text "
                                   "(files, globs, directories, JSONL, or shakespeare)")
    calibration_tokens: int = field(8192, help="gptq / awq: tokens of calibration text to use")
    calibration_seq_len: int = field(256, help="gptq / awq: tokens per calibration sequence")
    seed: int = field(0, help="which calibration windows are drawn")

    def __post_init__(self) -> None:
        check_seed(self.seed)
        from lmstack.errors import ConfigError

        if self.activations != "none" and self.scheme == "nf4":
            raise ConfigError("--activations int8 needs int8 or int4 weights (int8, int4, gptq, awq), not nf4")
        if self.calibration_tokens < self.calibration_seq_len or self.calibration_seq_len < 1:
            raise ConfigError("calibration_tokens must be at least calibration_seq_len (>= 1)")
