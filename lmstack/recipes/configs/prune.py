"""What `lmstack prune` takes."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import check_seed, field


@dataclass
class PruneConfig:
    """Prune a decoder checkpoint: zero weights (magnitude, Wanda, SparseGPT; a fraction or an N:M pattern) and/or
    remove heads, MLP channels and layers (a smaller model), then save it in Hugging Face format."""

    source: Path = field(help="checkpoint directory, .gguf file, or a bundled name (smollm2-135m-instruct)",
                         positional=True)
    output: Path = field(help="output directory (config.json + model.safetensors + tokenizer)", positional=True)
    method: Literal["none", "magnitude", "wanda", "sparsegpt"] = field(
        "magnitude", help="which weights to zero: the smallest |W|; Wanda's |W|·‖X‖ per row; SparseGPT with weight "
                          "reconstruction (none: structured pruning only)")
    sparsity: float = field(0.5, help="fraction of each linear's weights to zero, in [0, 1)")
    pattern: str | None = field(None, help="N:M: keep N of every M consecutive weights instead (e.g. 2:4)")
    scope: Literal["layer", "global"] = field("layer", help="magnitude: each matrix its fraction, or one threshold "
                                                            "over all")
    heads: float = field(0.0, help="structured: fraction of each KV group's query heads to remove")
    channels: float = field(0.0, help="structured: fraction of each MLP's hidden channels to remove")
    layers: int = field(0, help="structured: number of whole blocks to remove (least block influence)")
    importance: Literal["magnitude", "activation", "gradient"] = field(
        "magnitude", help="structured: how heads and channels are ranked (weight norms; output size on the "
                          "calibration text; |gradient x weight|)")
    calibration: list[str] = field(default_factory=lambda: ["shakespeare"], help="wanda / sparsegpt / calibrated "
                                   "importance / layers: calibration text (files, globs, directories, JSONL, or "
                                   "shakespeare)")
    calibration_tokens: int = field(8192, help="tokens of calibration text to use")
    calibration_seq_len: int = field(256, help="tokens per calibration sequence")
    seed: int = field(0, help="which calibration windows are drawn")

    def __post_init__(self) -> None:
        check_seed(self.seed)
        from lmstack.compress.settings import check_sparsity, parse_pattern
        from lmstack.errors import ConfigError

        check_sparsity(self.sparsity, "--sparsity")
        parse_pattern(self.pattern)
        check_sparsity(self.heads, "--heads")
        check_sparsity(self.channels, "--channels")
        if self.calibration_tokens < self.calibration_seq_len or self.calibration_seq_len < 1:
            raise ConfigError("calibration_tokens must be at least calibration_seq_len (>= 1)")
        if self.method == "none" and not (self.heads or self.channels or self.layers):
            raise ConfigError("--method none with no --heads, --channels or --layers prunes nothing")
