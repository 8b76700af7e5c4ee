"""Hugging Face ``config.json`` <-> EncoderConfig (BERT) and EncoderDecoderConfig (T5).

Absent keys take the defaults ``transformers`` uses for the family. BERT's head comes from
``architectures`` (BertForMaskedLM -> head "masked_lm", ...), its class names from ``id2label``.
"""

from typing import Any

from lmstack.errors import ConfigError
from lmstack.models.config import EncoderConfig, EncoderDecoderConfig
from lmstack.models.hf_configs import _activation, _get

BERT_ARCHITECTURES = {
    "BertModel": "none", "BertForMaskedLM": "masked_lm", "BertForNextSentencePrediction": "next_sentence",
    "BertForPreTraining": "pretraining", "BertForSequenceClassification": "sequence_classification",
    "BertForTokenClassification": "token_classification",
}
_HEAD_TO_ARCH = {head: arch for arch, head in BERT_ARCHITECTURES.items()}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _bert_head(c: dict[str, Any]) -> str:
    archs = c.get("architectures") or ["BertModel"]
    for arch in archs:
        if arch in BERT_ARCHITECTURES:
            return BERT_ARCHITECTURES[arch]
    raise ConfigError(f"unsupported BERT architectures {archs}; supported: {sorted(BERT_ARCHITECTURES)}")


def _labels(c: dict[str, Any]) -> tuple[str, ...]:
    """Class names from id2label ({"0": "NEG", ...}), else LABEL_0 .. LABEL_{num_labels-1}."""
    id2label = c.get("id2label")
    if id2label:
        try:
            by_id = {int(k): str(v) for k, v in id2label.items()}
        except (ValueError, AttributeError):
            raise ConfigError(f"id2label must map class ids to names, got {id2label!r}") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise ConfigError(f"id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
        return tuple(by_id[i] for i in range(len(by_id)))
    return tuple(f"LABEL_{i}" for i in range(int(c.get("num_labels", 2))))


def bert_from_hf(c: dict[str, Any]) -> EncoderConfig:
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"position_embedding_type={c['position_embedding_type']!r} is not supported (absolute only)")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        raise ConfigError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
    head = _bert_head(c)
    if head in ("sequence_classification", "token_classification") and c.get("problem_type") not in (
            None, "single_label_classification"):
        raise ConfigError(f"problem_type={c['problem_type']!r} is not supported (single_label_classification only)")
    return EncoderConfig(
        vocab_size=_get(c, "vocab_size", 30522), dim=_get(c, "hidden_size", 768),
        n_layers=_get(c, "num_hidden_layers", 12), n_heads=_get(c, "num_attention_heads", 12),
        ffn_dim=_get(c, "intermediate_size", 3072), max_seq_len=_get(c, "max_position_embeddings", 512),
        type_vocab_size=_get(c, "type_vocab_size", 2), norm_eps=float(_get(c, "layer_norm_eps", 1e-12)),
        activation=_activation(_get(c, "hidden_act", "gelu")), head=head,
        labels=_labels(c) if head in ("sequence_classification", "token_classification") else None,
        tie_embeddings=bool(_get(c, "tie_word_embeddings", True)),
        dropout=float(_get(c, "hidden_dropout_prob", 0.1)),
        attention_dropout=float(_get(c, "attention_probs_dropout_prob", 0.1)),
        classifier_dropout=c.get("classifier_dropout"), init_std=float(_get(c, "initializer_range", 0.02)),
        model_type="bert", pad_token_id=c.get("pad_token_id", 0))


def bert_to_hf(cfg: EncoderConfig) -> dict[str, Any]:
    out = {"model_type": "bert", "architectures": [_HEAD_TO_ARCH[cfg.head]], "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "intermediate_size": cfg.ffn_dim, "hidden_act": _ACT_TO_HF.get(cfg.activation, cfg.activation),
           "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
           "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
           "attention_probs_dropout_prob": cfg.attention_dropout,
           "classifier_dropout": cfg.classifier_dropout, "initializer_range": cfg.init_std,
           "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": cfg.pad_token_id,
           "position_embedding_type": "absolute"}
    if cfg.labels:
        out.update(num_labels=len(cfg.labels), id2label={str(i): name for i, name in enumerate(cfg.labels)},
                   label2id={name: i for i, name in enumerate(cfg.labels)})
    return out


def t5_from_hf(c: dict[str, Any]) -> EncoderDecoderConfig:
    proj = str(_get(c, "feed_forward_proj", "relu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(f"feed_forward_proj={proj!r} must be 'ACT' or 'gated-ACT'")
    # transformers maps "gated-gelu" (T5 v1.1) to the tanh approximation, and any other name through ACT2FN.
    activation = "gelu_tanh" if proj == "gated-gelu" else _activation(parts[-1])
    tied = c.get("tie_word_embeddings", True) is not False
    pad = c.get("pad_token_id", 0)
    return EncoderDecoderConfig(
        vocab_size=_get(c, "vocab_size", 32128), dim=_get(c, "d_model", 512), n_layers=_get(c, "num_layers", 6),
        n_heads=_get(c, "num_heads", 8), head_dim=_get(c, "d_kv", 64), ffn_dim=_get(c, "d_ff", 2048),
        n_decoder_layers=c.get("num_decoder_layers"), mlp="gated" if len(parts) == 2 else "plain",
        activation=activation, norm_eps=float(_get(c, "layer_norm_epsilon", 1e-6)),
        relative_buckets=_get(c, "relative_attention_num_buckets", 32),
        relative_max_distance=_get(c, "relative_attention_max_distance", 128), tie_embeddings=tied,
        scale_decoder_output=bool(c.get("scale_decoder_outputs", tied)),
        dropout=float(_get(c, "dropout_rate", 0.1)), init_std=float(_get(c, "initializer_factor", 1.0)),
        model_type="t5", pad_token_id=pad, eos_token_id=c.get("eos_token_id", 1),
        decoder_start_token_id=c.get("decoder_start_token_id", pad), bos_token_id=c.get("bos_token_id"))


def t5_to_hf(cfg: EncoderDecoderConfig) -> dict[str, Any]:
    act = _ACT_TO_HF.get(cfg.activation, cfg.activation)
    if cfg.mlp == "gated":
        proj = "gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}"
    else:
        proj = act
    return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": cfg.vocab_size,
            "d_model": cfg.dim, "d_kv": cfg.head_dim, "d_ff": cfg.ffn_dim, "num_layers": cfg.n_layers,
            "num_decoder_layers": cfg.n_decoder_layers, "num_heads": cfg.n_heads,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance, "dropout_rate": cfg.dropout,
            "layer_norm_epsilon": cfg.norm_eps, "initializer_factor": cfg.init_std, "feed_forward_proj": proj,
            "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.scale_decoder_output,
            "is_encoder_decoder": True, "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
            "decoder_start_token_id": cfg.decoder_start_token_id, "bos_token_id": cfg.bos_token_id}
