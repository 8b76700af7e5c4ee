"""What `lmstack serve` takes."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import field
from lmstack.errors import ConfigError


@dataclass(kw_only=True)
class ServeConfig:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching (and a web chat at /)."""

    model: Path = field(help="checkpoint directory, a .gguf file, or smollm2-135m-instruct (the bundled package)")
    model_name: str | None = field(None, help="the model id clients send and /v1/models lists (default: the "
                                              "model folder's or file's name)")
    quantize: Literal["none", "int8", "int4", "nf4", "gguf"] = field(
        "none", help="quantize the weights after loading; gguf: keep a GGUF file's Q8_0/Q4_0/Q4_1 tensors")
    group_size: int | None = field(None, help="inputs per scale when quantizing (32, 64, 128, 256)")
    activations: Literal["none", "int8"] = field("none", help="with --quantize: int8 activations too (dynamic)")
    fast_kernels: bool = field(True, help="use lmstack's CPU decoding kernels for small batches")
    host: str = field("127.0.0.1", help="address to listen on")
    port: int = field(8000, help="TCP port")
    max_batch: int = field(32, help="sequences decoding together at most")
    max_batch_tokens: int = field(256, help="tokens per engine step at most (decode tokens + prefill chunks)")
    kv_blocks: int = field(2048, help="KV-cache blocks in the pool (each holds --block-size tokens)")
    block_size: int = field(16, help="tokens per KV-cache block")
    max_waiting: int = field(256, help="requests queued before new ones are refused with 429")
    prefix_caching: bool = field(True, help="reuse the KV blocks of prompt prefixes seen before")
    embedding_model: Path | None = field(None, help="an encoder checkpoint for /v1/embeddings (e.g. "
                                                    "all-minilm-l6-v2, the bundled package)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = field("info", help="uvicorn's log level")

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_batch_tokens", "kv_blocks", "block_size", "max_waiting"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port={self.port} must be in [0, 65536)")
        if self.activations != "none" and self.quantize not in ("int8", "int4", "gguf"):
            raise ConfigError(f"--activations {self.activations} needs --quantize int8, int4 or gguf")
