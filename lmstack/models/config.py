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
class MoEConfig:
    """The mixture-of-experts feed-forward block of a decoder (``lmstack.nn.moe.MoE``).

    Each token's router scores pick ``top_k`` of ``num_experts`` experts (feed-forward blocks of the
    decoder's ``mlp`` / ``activation`` kind, width ``expert_dim``); their outputs are summed with the
    router weights, plus a sigmoid-gated shared expert when ``shared_expert_dim`` is set (Qwen-MoE).
    """

    num_experts: int
    expert_dim: int  # hidden width of each expert (HF Mixtral intermediate_size, Qwen-MoE moe_intermediate_size)
    top_k: int = 2
    score: Literal["softmax", "sigmoid"] = "softmax"  # router scores over the experts
    normalize_top_k: bool = True  # the k weights divided by their sum (Mixtral: yes; Qwen2-MoE: no)
    noisy_gating: bool = False  # Shazeer et al. 2017: learned, softplus-scaled Gaussian noise while training
    router_jitter: float = 0.0  # while training, the block's input times U(1 - j, 1 + j) (Mixtral's jitter)
    capacity_factor: float | None = None  # Switch: at most ceil(factor * tokens * k / experts) per expert
    # while training; the rest is dropped (the residual carries the token). None: no limit.
    shared_expert_dim: int | None = None  # an always-on expert of this width (Qwen-MoE)
    shared_expert_gate: bool = True  # the shared expert's output scaled by sigmoid(w . x)
    every: int = 1  # layer i is an MoE layer when (i + 1) % every == 0 (HF decoder_sparse_step)...
    dense_layers: tuple[int, ...] = ()  # ...and i is not listed here (HF mlp_only_layers); dense layers
    # keep the decoder's MLP of width ffn_dim
    aux_loss_coef: float = 0.01  # load-balancing loss weight in the training objective
    z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE)

    def __post_init__(self) -> None:
        if not isinstance(self.dense_layers, (list, tuple)):
            raise ConfigError(f"moe.dense_layers must be a list of layer indices, got {self.dense_layers!r}")
        self.dense_layers = tuple(self.dense_layers)
        _check_positive(self, ("num_experts", "expert_dim", "top_k", "every"), "moe.")
        if self.top_k > self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}")
        if self.score not in ("softmax", "sigmoid"):
            raise ConfigError(f"moe.score={self.score!r} is not one of ['softmax', 'sigmoid']")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"moe.capacity_factor={self.capacity_factor} must be > 0 (or null for no limit)")
        value = self.shared_expert_dim
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"moe.shared_expert_dim={value!r} must be a positive integer or null")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ConfigError(f"moe.router_jitter={self.router_jitter} must be in [0, 1)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"moe.{name}={getattr(self, name)} must be >= 0")

    def applies_to(self, layer: int) -> bool:
        """Whether layer ``layer`` has experts (else a dense MLP)."""
        return (layer + 1) % self.every == 0 and layer not in self.dense_layers


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
    qk_norm: bool = False  # RMSNorm over each head's query and key before RoPE (Qwen3)
    # --- positions ---
    position: Literal["rope", "learned", "sinusoidal", "alibi", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # --- attention span ---
    sliding_window: int | None = None  # None: full causal attention
    sliding_window_layers: tuple[int, ...] | None = None  # layers using the window; None: all of them
    # --- embeddings and training ---
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    # --- output ---
    num_scores: int | None = None  # a `score` head of this many outputs per position instead of the LM head
    # (reward and value models; HF ...ForSequenceClassification with num_labels)
    dropout: float = 0.0  # embedding, attention-probability and residual dropout while training
    init_std: float = 0.02
    # --- mixture of experts ---
    moe: MoEConfig | None = None  # experts in place of the MLP (on the layers moe.applies_to); None: dense
    # --- metadata (not read by the model) ---
    model_type: str | None = None  # Hugging Face model_type this config maps to, for save_hf
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if isinstance(self.moe, dict):
            self.moe = _moe_from_dict(self.moe)
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
        _check_positive(self, ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "n_kv_heads", "head_dim",
                               "max_seq_len"))
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {list(choices)}")
        if self.num_scores is not None and (self.num_scores < 1 or self.tie_embeddings):
            raise ConfigError(f"num_scores={self.num_scores} needs num_scores >= 1 and tie_embeddings=False "
                              "(a score head has no embedding matrix to share)")
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
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ConfigError(f"moe must be a MoEConfig or a mapping of its fields, got {self.moe!r}")
            for layer in self.moe.dense_layers:
                if not 0 <= layer < self.n_layers:
                    raise ConfigError(f"moe.dense_layers contains {layer}, outside 0..{self.n_layers - 1}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` routes tokens to experts."""
        return self.moe is not None and self.moe.applies_to(layer)

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


ENCODER_HEADS = ("none", "masked_lm", "next_sentence", "pretraining", "sequence_classification",
                 "token_classification")
LABELED_HEADS = ("sequence_classification", "token_classification")


@dataclass
class EncoderConfig:
    """A bidirectional post-norm encoder (BERT) and the task head on top of it.

    Layer (post-norm): x = norm(x + attn(x)); x = norm(x + mlp(x)). Embeddings: token + learned
    position + token type, then a LayerNorm.
    """

    # --- sizes ---
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_seq_len: int = 512  # learned position table size
    type_vocab_size: int = 2  # token types (segments A/B)
    # --- block choices ---
    norm_eps: float = 1e-12
    activation: str = "gelu"
    # --- head ---
    head: str = "none"  # one of ENCODER_HEADS
    labels: tuple[str, ...] | None = None  # class names of a classification head, index = class id
    tie_embeddings: bool = True  # the masked-LM decoder shares the token-embedding matrix
    # --- training ---
    dropout: float = 0.1  # embeddings and residual branches
    attention_dropout: float = 0.1
    classifier_dropout: float | None = None  # before a classification head; None: ``dropout``
    init_std: float = 0.02
    # --- metadata (not read by the model) ---
    model_type: str | None = None
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if self.labels is not None:
            if not isinstance(self.labels, (list, tuple)) or not all(isinstance(x, str) for x in self.labels):
                raise ConfigError(f"labels must be a list of class names, got {self.labels!r}")
            self.labels = tuple(self.labels)
        _check_positive(self, ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len",
                               "type_vocab_size"))
        if self.dim % self.n_heads:
            raise ConfigError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.head not in ENCODER_HEADS:
            raise ConfigError(f"head={self.head!r} is not one of {list(ENCODER_HEADS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.head in LABELED_HEADS and not self.labels:
            raise ConfigError(f"head={self.head!r} needs labels (the class names)")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels contain duplicates: {list(self.labels)}")
        for name in ("dropout", "attention_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value} must be in [0, 1)")

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 0

    @property
    def uses_pooler(self) -> bool:
        """Heads reading the [CLS] summary have a pooler (as in Hugging Face's BERT classes)."""
        return self.head in ("none", "next_sentence", "pretraining", "sequence_classification")

    @property
    def context_limit(self) -> int:
        return self.max_seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "EncoderConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class EncoderDecoderConfig:
    """A T5-style encoder-decoder: pre-RMSNorm blocks, relative position buckets, no attention scaling.

    Encoder layer: x += attn(norm(x)); x += mlp(norm(x)). Decoder layer adds x += cross_attn(norm(x), enc).
    """

    vocab_size: int
    dim: int  # d_model
    n_layers: int  # encoder layers
    n_heads: int
    head_dim: int  # d_kv (need not be dim // n_heads)
    ffn_dim: int  # d_ff
    n_decoder_layers: int | None = None  # default n_layers
    mlp: Literal["plain", "gated"] = "plain"  # T5 v1.0: plain ReLU; v1.1: gated GELU
    activation: str = "relu"
    norm_eps: float = 1e-6
    relative_buckets: int = 32
    relative_max_distance: int = 128
    tie_embeddings: bool = True  # lm_head shares the embedding matrix
    scale_decoder_output: bool = True  # multiply the decoder output by dim**-0.5 before lm_head
    dropout: float = 0.1
    init_std: float = 1.0  # T5's initializer_factor
    model_type: str | None = None
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        self.n_decoder_layers = self.n_decoder_layers or self.n_layers
        _check_positive(self, ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "ffn_dim", "n_decoder_layers",
                               "relative_buckets", "relative_max_distance"))
        if self.mlp not in ("plain", "gated"):
            raise ConfigError(f"mlp={self.mlp!r} is not one of ['plain', 'gated']")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def context_limit(self) -> None:
        return None  # relative positions: no trained length limit

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "EncoderDecoderConfig":
        return dataclasses.replace(self, **changes)


def _check_positive(config: Any, names: tuple[str, ...], prefix: str = "") -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{prefix}{name}={value!r} must be a positive integer")


def _moe_from_dict(data: dict[str, Any]) -> MoEConfig:
    known = {f.name for f in fields(MoEConfig)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown moe field {key!r}{_suggest(key, known)}")
    try:
        return MoEConfig(**data)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"moe: {error}") from None


def _suggest(key: str, known: set[str]) -> str:
    """'; did you mean X?' for the closest known name, or ''."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


__all__ = ["DecoderConfig", "MoEConfig", "ENCODER_HEADS", "EncoderConfig", "EncoderDecoderConfig", "RopeScaling"]
