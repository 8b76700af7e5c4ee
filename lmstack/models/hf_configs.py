"""Hugging Face ``config.json`` <-> DecoderConfig, one pair of functions per family.

Absent keys take the default that ``transformers`` itself uses for that family, so a config.json written
with only the non-default fields reads the same here as there. Writing emits both the current
(``rope_parameters``) and the legacy (``rope_theta`` / ``rope_scaling``) RoPE keys so old and new
``transformers`` read the file alike.
"""

from dataclasses import fields
from typing import Any, Callable

from lmstack.errors import ConfigError
from lmstack.models.config import DecoderConfig, MoEConfig
from lmstack.nn.positions import RopeScaling

_REQUIRED = object()

# HF activation names -> ours. "gelu_new"/"gelu_fast"/"gelu_pytorch_tanh" are all the tanh approximation.
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "gelu_python": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}


def _get(c: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """c[key], the family default when absent, or a ConfigError naming the missing key."""
    if key in c and c[key] is not None:
        return c[key]
    if default is _REQUIRED:
        raise ConfigError(f"config.json has no {key!r}")
    return default


def _activation(name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ConfigError(f"unsupported activation {name!r}; supported: {sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def _special_tokens(c: dict[str, Any]) -> dict[str, Any]:
    return {k: c.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _score_head(c: dict[str, Any]) -> dict[str, Any]:
    """num_scores of a ``...ForSequenceClassification`` checkpoint (its ``score`` head), else None."""
    if not any(str(a).endswith("ForSequenceClassification") for a in c.get("architectures") or []):
        return {"num_scores": None}
    labels = c.get("id2label")
    return {"num_scores": len(labels) if isinstance(labels, dict) and labels else int(c.get("num_labels", 2))}


def _score_head_to_hf(cfg: DecoderConfig, architecture: str) -> dict[str, Any]:
    """A score model is saved as the family's sequence-classification class (``score.weight``, num_labels)."""
    if cfg.num_scores is None:
        return {}
    base = architecture.removesuffix("LMHeadModel").removesuffix("ForCausalLM")
    names = {str(i): f"LABEL_{i}" for i in range(cfg.num_scores)}
    return {"architectures": [f"{base}ForSequenceClassification"], "num_labels": cfg.num_scores,
            "id2label": names, "label2id": {v: int(k) for k, v in names.items()}}


def _rope_from_hf(c: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    """Read RoPE base and scaling from either the v5 ``rope_parameters`` or the legacy keys."""
    params = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_scaling/rope_parameters must be an object, got {params!r}")
    theta = float(c.get("rope_theta") or params.get("rope_theta") or default_theta)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise ConfigError(f"unsupported rope_type {kind!r}; supported: default, linear, dynamic, llama3, yarn")
    yarn = {}
    if kind == "yarn":
        yarn = dict(attention_factor=params.get("attention_factor"), beta_fast=float(params.get("beta_fast") or 32),
                    beta_slow=float(params.get("beta_slow") or 1), mscale=params.get("mscale"),
                    mscale_all_dim=params.get("mscale_all_dim"), truncate=bool(params.get("truncate", True)))
    return theta, RopeScaling(
        kind=kind, factor=float(_get(params, "factor")),
        original_max_positions=params.get("original_max_position_embeddings") or c.get("max_position_embeddings"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)), **yarn)


def _rope_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    s = cfg.rope_scaling
    scaling = None
    if s is not None:
        scaling = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                           original_max_position_embeddings=s.original_max_positions)
        if s.kind == "yarn":
            scaling.update(original_max_position_embeddings=s.original_max_positions, beta_fast=s.beta_fast,
                           beta_slow=s.beta_slow, truncate=s.truncate)
            scaling.update({k: v for k, v in (("attention_factor", s.attention_factor), ("mscale", s.mscale),
                                              ("mscale_all_dim", s.mscale_all_dim)) if v is not None})
    params = {"rope_type": "default"} if scaling is None else dict(scaling)
    params["rope_theta"] = cfg.rope_theta
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


# --- GPT-2 ---------------------------------------------------------------------------------------------

def gpt2_from_hf(c: dict[str, Any]) -> DecoderConfig:
    if c.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("scale_attn_by_inverse_layer_idx=true is not supported")
    if c.get("scale_attn_weights", True) is False:
        raise ConfigError("scale_attn_weights=false is not supported")
    dim = _get(c, "n_embd", 768)
    heads = _get(c, "n_head", 12)
    if isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads:
        raise ConfigError(f"n_embd={dim} must be a multiple of n_head={heads} (GPT-2 splits the width into heads)")
    return DecoderConfig(
        vocab_size=_get(c, "vocab_size", 50257), dim=dim, n_layers=_get(c, "n_layer", 12),
        n_heads=_get(c, "n_head", 12), ffn_dim=_get(c, "n_inner", None) or 4 * dim,
        max_seq_len=_get(c, "n_positions", 1024), norm="layernorm",
        norm_eps=float(_get(c, "layer_norm_epsilon", 1e-5)), mlp="plain",
        activation=_activation(_get(c, "activation_function", "gelu_new")), mlp_bias=True, qkv_bias=True,
        out_bias=True, position="learned", tie_embeddings=bool(_get(c, "tie_word_embeddings", True)),
        dropout=float(_get(c, "resid_pdrop", 0.1)), init_std=float(_get(c, "initializer_range", 0.02)),
        model_type="gpt2", **_special_tokens(c), **_score_head(c))


def gpt2_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    act = "gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.ffn_dim, "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
            **_special_tokens(cfg.to_dict()), **_score_head_to_hf(cfg, "GPT2LMHeadModel")}


# --- Llama, Mistral, Qwen2 -------------------------------------------------------------------------------

def _llama_like(c: dict[str, Any], model_type: str, *, eps: float, max_pos: int, qkv_bias: bool,
                out_bias: bool, window: int | None, window_layers: tuple[int, ...] | None,
                moe: MoEConfig | None = None, theta: float = 10000.0, qk_norm: bool = False) -> DecoderConfig:
    dim, n_heads = _get(c, "hidden_size"), _get(c, "num_attention_heads")
    theta, scaling = _rope_from_hf(c, theta)
    return DecoderConfig(
        vocab_size=_get(c, "vocab_size"), dim=dim, n_layers=_get(c, "num_hidden_layers"), n_heads=n_heads,
        ffn_dim=_get(c, "intermediate_size"), n_kv_heads=_get(c, "num_key_value_heads", n_heads),
        head_dim=_get(c, "head_dim", None) or (dim // n_heads if isinstance(dim, int) and n_heads else None),
        max_seq_len=_get(c, "max_position_embeddings", max_pos), norm="rmsnorm",
        norm_eps=float(_get(c, "rms_norm_eps", eps)), mlp="gated", activation=_activation(_get(c, "hidden_act", "silu")),
        mlp_bias=bool(c.get("mlp_bias", False)), qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=qk_norm, position="rope",
        rope_theta=theta, rope_scaling=scaling, sliding_window=window, sliding_window_layers=window_layers,
        tie_embeddings=bool(_get(c, "tie_word_embeddings", False)),
        dropout=float(_get(c, "attention_dropout", 0.0)), init_std=float(_get(c, "initializer_range", 0.02)),
        moe=moe, model_type=model_type, **_special_tokens(c), **_score_head(c))


def _llama_like_to_hf(cfg: DecoderConfig, model_type: str, architecture: str) -> dict[str, Any]:
    act = "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else cfg.activation
    return {"model_type": model_type, "architectures": [architecture], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": act, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout,
            "initializer_range": cfg.init_std, **_rope_to_hf(cfg), **_special_tokens(cfg.to_dict()),
            **_score_head_to_hf(cfg, architecture)}


def llama_from_hf(c: dict[str, Any]) -> DecoderConfig:
    bias = bool(c.get("attention_bias", False))
    return _llama_like(c, "llama", eps=1e-6, max_pos=2048, qkv_bias=bias, out_bias=bias,
                       window=None, window_layers=None)


def llama_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    out = _llama_like_to_hf(cfg, "llama", "LlamaForCausalLM")
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return out


def mistral_from_hf(c: dict[str, Any]) -> DecoderConfig:
    window = c["sliding_window"] if "sliding_window" in c else 4096  # Mistral's default when absent
    return _llama_like(c, "mistral", eps=1e-6, max_pos=4096 * 32, qkv_bias=False, out_bias=False,
                       window=window, window_layers=None)


def mistral_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    out = _llama_like_to_hf(cfg, "mistral", "MistralForCausalLM")
    out["sliding_window"] = cfg.sliding_window
    return out


def _qwen2_window(c: dict[str, Any], n_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """Qwen2 slides only on some layers: from ``layer_types`` if present, else layers >= max_window_layers."""
    window = c.get("sliding_window", 4096) if "layer_types" in c or c.get("use_sliding_window") else None
    if "layer_types" in c and c["layer_types"] is not None:
        if len(c["layer_types"]) != n_layers:
            raise ConfigError(f"layer_types has {len(c['layer_types'])} entries for {n_layers} layers")
        layers = tuple(i for i, t in enumerate(c["layer_types"]) if t == "sliding_attention")
    else:
        layers = tuple(range(c.get("max_window_layers", 28), n_layers))
    if window is None or not layers:
        return None, None
    return window, (None if len(layers) == n_layers else layers)


def qwen2_from_hf(c: dict[str, Any]) -> DecoderConfig:
    window, layers = _qwen2_window(c, _get(c, "num_hidden_layers"))
    return _llama_like(c, "qwen2", eps=1e-6, max_pos=32768, qkv_bias=True, out_bias=False,
                       window=window, window_layers=layers)


def qwen2_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    out = _llama_like_to_hf(cfg, "qwen2", "Qwen2ForCausalLM")
    layers = [i for i in range(cfg.n_layers) if cfg.window_for_layer(i) is not None]
    first = layers[0] if layers else cfg.n_layers
    out.update(use_sliding_window=bool(layers), sliding_window=cfg.sliding_window, max_window_layers=first,
               layer_types=["sliding_attention" if i in layers else "full_attention" for i in range(cfg.n_layers)])
    return out


def qwen3_from_hf(c: dict[str, Any]) -> DecoderConfig:
    """Qwen3: Qwen2's layout with per-head q / k norms, attention_bias for all four projections and an
    explicit head_dim."""
    window, layers = _qwen2_window(c, _get(c, "num_hidden_layers"))
    bias = bool(c.get("attention_bias", False))
    return _llama_like(c, "qwen3", eps=1e-6, max_pos=32768, qkv_bias=bias, out_bias=bias, window=window,
                       window_layers=layers, qk_norm=True)


def qwen3_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    out = qwen2_to_hf(cfg)
    out.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=cfg.qkv_bias)
    out.update(_score_head_to_hf(cfg, "Qwen3ForCausalLM"))
    return out


# --- Mixtral, Qwen2-MoE, Qwen3-MoE (mixtures of experts) ---------------------------------------------------
# Training-only settings transformers has no key for are written under keys of their own (transformers keeps
# unknown keys and ignores them; its logits are the same, since inference never drops tokens).

def _moe_training_keys(c: dict[str, Any]) -> dict[str, Any]:
    return {"aux_loss_coef": float(_get(c, "router_aux_loss_coef", 0.001)),
            "z_loss_coef": float(_get(c, "router_z_loss_coef", 0.0)),
            "capacity_factor": c.get("router_capacity_factor")}


def _moe_training_keys_to_hf(m: MoEConfig) -> dict[str, Any]:
    out = {"router_aux_loss_coef": m.aux_loss_coef, "output_router_logits": False}
    if m.z_loss_coef:
        out["router_z_loss_coef"] = m.z_loss_coef
    if m.capacity_factor is not None:
        out["router_capacity_factor"] = m.capacity_factor
    return out


def mixtral_from_hf(c: dict[str, Any]) -> DecoderConfig:
    moe = MoEConfig(num_experts=_get(c, "num_local_experts", 8), expert_dim=_get(c, "intermediate_size"),
                    top_k=_get(c, "num_experts_per_tok", 2), normalize_top_k=True,
                    router_jitter=float(_get(c, "router_jitter_noise", 0.0)), **_moe_training_keys(c))
    return _llama_like(c, "mixtral", eps=1e-5, max_pos=4096 * 32, qkv_bias=False, out_bias=False,
                       window=c.get("sliding_window"), window_layers=None, moe=moe, theta=1e6)


def mixtral_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    m = _require_moe(cfg, "mixtral")
    out = _llama_like_to_hf(cfg, "mixtral", "MixtralForCausalLM")
    out.update(intermediate_size=m.expert_dim, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
               router_jitter_noise=m.router_jitter, sliding_window=cfg.sliding_window, **_moe_training_keys_to_hf(m))
    return out


def _qwen2_moe_window(c: dict[str, Any], n_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """Qwen2-MoE's sliding layers: ``layer_types`` if present, else (its own rule) the even-numbered layers
    below max_window_layers."""
    if "layer_types" in c and c["layer_types"] is not None:
        return _qwen2_window(c, n_layers)
    if not c.get("use_sliding_window"):
        return None, None
    layers = tuple(i for i in range(n_layers) if (i + 1) % 2 and i < c.get("max_window_layers", 28))
    window = c.get("sliding_window", 4096)
    if not layers or not window:
        return None, None
    return window, (None if len(layers) == n_layers else layers)


def _qwen_moe_from_hf(c: dict[str, Any], *, num_experts: int, expert_dim: int, top_k: int,
                      **shared: Any) -> MoEConfig:
    """The MoE keys Qwen2-MoE and Qwen3-MoE share (defaults: each family's published ones); ``shared``:
    Qwen2-MoE's shared-expert fields."""
    return MoEConfig(num_experts=_get(c, "num_experts", None) or _get(c, "num_local_experts", num_experts),
                     expert_dim=_get(c, "moe_intermediate_size", expert_dim),
                     top_k=_get(c, "num_experts_per_tok", top_k), normalize_top_k=bool(c.get("norm_topk_prob", False)),
                     every=_get(c, "decoder_sparse_step", 1), dense_layers=tuple(c.get("mlp_only_layers") or ()),
                     **shared, **_moe_training_keys(c))


def _qwen_moe_to_hf(m: MoEConfig) -> dict[str, Any]:
    return {"num_experts": m.num_experts, "moe_intermediate_size": m.expert_dim, "num_experts_per_tok": m.top_k,
            "norm_topk_prob": m.normalize_top_k, "decoder_sparse_step": m.every,
            "mlp_only_layers": list(m.dense_layers), **_moe_training_keys_to_hf(m)}


def qwen2_moe_from_hf(c: dict[str, Any]) -> DecoderConfig:
    window, layers = _qwen2_moe_window(c, _get(c, "num_hidden_layers"))
    moe = _qwen_moe_from_hf(c, num_experts=60, expert_dim=1408, top_k=4, shared_expert_gate=True,
                            shared_expert_dim=_get(c, "shared_expert_intermediate_size", 5632))
    return _llama_like(c, "qwen2_moe", eps=1e-6, max_pos=32768, qkv_bias=bool(c.get("qkv_bias", True)),
                       out_bias=False, window=window, window_layers=layers, moe=moe)


def qwen2_moe_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    m = _require_moe(cfg, "qwen2_moe")
    out = qwen2_to_hf(cfg)
    out.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], qkv_bias=cfg.qkv_bias,
               shared_expert_intermediate_size=m.shared_expert_dim, **_qwen_moe_to_hf(m))
    out.update(_score_head_to_hf(cfg, "Qwen2MoeForCausalLM"))
    return out


def qwen3_moe_from_hf(c: dict[str, Any]) -> DecoderConfig:
    """Qwen3-MoE: Qwen3 attention (q / k norms), no shared expert; a sliding window (when
    use_sliding_window) on every layer, as transformers applies it."""
    moe = _qwen_moe_from_hf(c, num_experts=128, expert_dim=768, top_k=8)
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    bias = bool(c.get("attention_bias", False))
    return _llama_like(c, "qwen3_moe", eps=1e-6, max_pos=32768, qkv_bias=bias, out_bias=bias, window=window,
                       window_layers=None, moe=moe, qk_norm=True)


def qwen3_moe_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    m = _require_moe(cfg, "qwen3_moe")
    out = _llama_like_to_hf(cfg, "qwen3_moe", "Qwen3MoeForCausalLM")
    out.update(attention_bias=cfg.qkv_bias, use_sliding_window=cfg.sliding_window is not None,
               sliding_window=cfg.sliding_window, **_qwen_moe_to_hf(m))
    return out


def _require_moe(cfg: DecoderConfig, model_type: str) -> MoEConfig:
    if cfg.moe is None:
        raise ConfigError(f"a {model_type} checkpoint needs a mixture-of-experts config (moe), this one is dense")
    return cfg.moe


def expressible(from_hf: Callable[[dict], Any], to_hf: Callable[[Any], dict], cfg: Any) -> str | None:
    """None if ``to_hf`` then ``from_hf`` gives back ``cfg`` exactly; otherwise the reason it does not."""
    try:
        back = from_hf(to_hf(cfg))
    except ConfigError as error:
        return str(error)
    differing = [f.name for f in fields(type(cfg))
                 if f.name != "model_type" and getattr(back, f.name) != getattr(cfg, f.name)]
    return f"fields {differing} cannot be expressed" if differing else None
