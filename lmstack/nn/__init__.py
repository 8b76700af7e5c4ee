"""Building blocks: attention, positions, norms, MLPs, KV cache. Explicit arguments, no model configs."""

from lmstack.nn.attention import ATTENTION_BACKENDS, Attention, attend, set_attention_backend
from lmstack.nn.kv_cache import KVCache, StaticKVCache
from lmstack.nn.masks import AttentionMask
from lmstack.nn.mlp import ACTIVATIONS, MLP, GatedMLP, make_mlp
from lmstack.nn.norms import RMSNorm, make_norm
from lmstack.nn.positions import (
    LearnedPositions,
    RelativePositionBias,
    RopeScaling,
    RotaryEmbedding,
    SinusoidalPositions,
    alibi_slopes,
    apply_rotary,
)

__all__ = [
    "ACTIVATIONS", "ATTENTION_BACKENDS", "Attention", "AttentionMask", "GatedMLP", "KVCache",
    "LearnedPositions", "MLP", "RelativePositionBias", "RMSNorm", "RopeScaling", "RotaryEmbedding", "SinusoidalPositions",
    "StaticKVCache", "alibi_slopes", "apply_rotary", "attend", "make_mlp", "make_norm",
    "set_attention_backend",
]
