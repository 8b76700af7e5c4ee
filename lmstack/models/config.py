"""Model configurations: one dataclass per model kind. Fields describe the math, never a family name.

Validation happens in ``__post_init__`` and raises ConfigError naming the field and value.
"""

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Literal

from lmstack.errors import ConfigError
from lmstack.nn.mlp import ACTIVATIONS
from lmstack.nn.positions import RopeScaling

_CHOICES: dict[str, tuple] = {
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("plain", "gated"),
    "position": ("rope", "learned", "sinusoidal", "alibi", "none"),
    "activation": tuple(ACTIVATIONS),
}


@dataclass
class DecoderConfig:
    """A decoder-only transformer (GPT-2, Llama, Mistral, Qwen2 and their relatives).

    Block (pre-norm):  x = x + attn(norm(x)); x = x + mlp(norm(x)); logits = lm_head(norm(x)).
    """

    # --- sizes ---
    vocab_size: int
    dim: int  # model width C (HF hidden_size / n_embd)
    n_layers: int
    n_heads: int
    ffn_dim: int  # hidden width of the feed-forward block (HF intermediate_size / n_inner)
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; default n_heads
    head_dim: int | None = None  # per-head width; default dim // n_heads
    max_seq_len: int = 2048  # context length (learned positions: table size)
    # --- block choices ---
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm bias (ignored for RMSNorm)
    mlp: Literal["plain", "gated"] = "gated"
    activation: str = "silu"  # one of lmstack.nn.ACTIVATIONS
    mlp_bias: bool = False
    qkv_bias: bool = False
    out_bias: bool = False  # bias of the attention output projection
    # --- positions ---
    position: Literal["rope", "learned", "sinusoidal", "alibi", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # --- attention span ---
    sliding_window: int | None = None  # None: full causal attention
    sliding_window_layers: tuple[int, ...] | None = None  # layers using the window; None: all of them
    # --- embeddings and training ---
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    dropout: float = 0.0  # embedding, attention-probability and residual dropout while training
    init_std: float = 0.02
    # --- metadata (not read by the model) ---
    model_type: str | None = None  # Hugging Face model_type this config maps to, for save_hf
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.sliding_window_layers is not None:
            if not isinstance(self.sliding_window_layers, (list, tuple)):
                raise ConfigError(f"sliding_window_layers must be a list of layer indices, "
                                  f"got {self.sliding_window_layers!r}")
            self.sliding_window_layers = tuple(self.sliding_window_layers)
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "n_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {list(choices)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.position in ("rope", "sinusoidal") and self.head_dim % 2:
            raise ConfigError(f"position={self.position!r} needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window={self.sliding_window} must be a positive integer or None")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps={self.norm_eps} must be > 0")
        if self.rope_scaling is not None and self.position != "rope":
            raise ConfigError(f"rope_scaling is set but position={self.position!r}")
        for layer in self.sliding_window_layers or ():
            if not 0 <= layer < self.n_layers:
                raise ConfigError(f"sliding_window_layers contains {layer}, outside 0..{self.n_layers - 1}")

    def window_for_layer(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: full attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

    @property
    def context_limit(self) -> int | None:
        """Longest sequence the model accepts: max_seq_len, or None for dynamic-NTK RoPE, which exists
        precisely to run past the trained length."""
        if self.rope_scaling is not None and self.rope_scaling.kind == "dynamic":
            return None
        return self.max_seq_len

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the config (rope_scaling as a dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecoderConfig":
        """Build from a dict, rejecting unknown keys with the nearest valid name."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown DecoderConfig field {key!r}{_suggest(key, known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "DecoderConfig":
        """A copy with some fields changed (validated again)."""
        return DecoderConfig.from_dict({**self.to_dict(), **changes})


def _suggest(key: str, known: set[str]) -> str:
    """'; did you mean X?' for the closest known name, or ''."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


__all__ = ["DecoderConfig", "RopeScaling"]
