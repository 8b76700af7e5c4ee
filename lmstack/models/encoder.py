"""The bidirectional encoder (BERT) with its task heads.

    input_ids, token_type_ids (B, T)
      -> embed_tokens + embed_positions + embed_token_types -> embed_norm       (B, T, C)
      -> n_layers x EncoderBlock:  x = attn_norm(x + attn(x));  x = mlp_norm(x + mlp(x))   (post-norm)
      -> hidden_states (B, T, C);  pooler(hidden[:, 0]) -> pooled (B, C)
      -> head: mlm_head (B, T, vocab) | nsp_head (B, 2) | classifier (B, labels) or (B, T, labels)

Which head exists is ``EncoderConfig.head`` (Hugging Face's ``architectures``: BertModel,
BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining, BertForSequenceClassification,
BertForTokenClassification). Shapes: B batch, T time, C width.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lmstack.models.config import EncoderConfig
from lmstack.models.heads import ClassificationHead, MaskedLMHead, Pooler
from lmstack.nn.attention import Attention
from lmstack.nn.embedding import embed_inputs
from lmstack.nn.masks import AttentionMask
from lmstack.nn.mlp import MLP
from lmstack.nn.positions import LearnedPositions


@dataclass
class EncoderOutput:
    """What an Encoder returns; fields its head does not produce are None.

    Attributes:
        hidden_states: (B, T, C) last layer.
        pooled: (B, C) pooler output (heads that use it, and the bare model).
        logits: (B, T, vocab) masked-LM, (B, labels) sequence or (B, T, labels) token classification.
        nsp_logits: (B, 2) next-sentence scores (0 = B follows A, 1 = B is random).
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None


class EncoderBlock(nn.Module):
    """One post-norm layer: attention and feed-forward, each added to its input and then normalised."""

    def __init__(self, config: EncoderConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn = Attention(config.dim, config.n_heads, qkv_bias=True, out_bias=True,
                              dropout=config.attention_dropout)
        self.attn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config.dim, config.ffn_dim, config.activation, bias=True)
        self.mlp_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: AttentionMask, kv_cache=None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); ``kv_cache`` may hold extra leading keys/values (a learned prefix)."""
        x = self.attn_norm(x + self.dropout(self.attn(x, mask, kv_cache=kv_cache, layer_idx=self.layer_idx)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Encoder(nn.Module):
    """BERT-style encoder driven by an EncoderConfig, with the head the config names."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.embed_positions = LearnedPositions(config.max_seq_len, config.dim)
        self.embed_token_types = nn.Embedding(config.type_vocab_size, config.dim)
        self.embed_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderBlock(config, i) for i in range(config.n_layers))
        self.pooler = Pooler(config.dim) if config.uses_pooler else None
        head = config.head
        self.mlm_head = (MaskedLMHead(config.dim, config.vocab_size, config.activation, config.norm_eps)
                         if head in ("masked_lm", "pretraining") else None)
        self.nsp_head = nn.Linear(config.dim, 2) if head in ("next_sentence", "pretraining") else None
        dropout = config.dropout if config.classifier_dropout is None else config.classifier_dropout
        self.classifier = (ClassificationHead(config.dim, config.num_labels, dropout)
                           if head in ("sequence_classification", "token_classification") else None)
        self.tie_weights()
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the masked-LM decoder with the token embeddings when the config ties them."""
        if self.mlm_head is not None and self.config.tie_embeddings:
            self.mlm_head.decoder.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT initialisation: N(0, init_std) weights and embeddings, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LearnedPositions):
                nn.init.normal_(module.weight, std=self.config.init_std)

    def hidden_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None, kv_cache=None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer states (B, T, C); see ``forward`` for the arguments."""
        tokens = embed_inputs(self.embed_tokens, input_ids, inputs_embeds)
        B, T = tokens.shape[:2]
        extra = kv_cache.length if kv_cache is not None else 0
        self._check_inputs((B, T), attention_mask, token_type_ids, extra)
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros((B, T), dtype=torch.long, device=tokens.device)
        x = tokens + self.embed_token_types(token_type_ids) + self.embed_positions(positions)
        x = self.dropout(self.embed_norm(x))
        padding = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
        mask = AttentionMask(causal=False, key_padding=padding)
        for layer in self.layers:
            x = layer(x, mask, kv_cache)
        return x

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, kv_cache=None,
                inputs_embeds: torch.Tensor | None = None) -> EncoderOutput:
        """Encode a batch and apply the head.

        Args:
            input_ids: (B, T) token ids (None when ``inputs_embeds`` is given).
            attention_mask: (B, extra + T) 1 for real tokens, 0 for padding; None means no padding.
            token_type_ids: (B, T) segment ids (0 for sentence A, 1 for B); default all 0.
            kv_cache: a KVCache already holding ``extra`` leading keys/values every token may attend to
                (prefix tuning's learned prefix); not advanced.
            inputs_embeds: (B, T, C) token embeddings instead of ``embed_tokens(input_ids)``.
        Returns:
            EncoderOutput with the fields the head produces.
        """
        return self.head_outputs(self.hidden_states(input_ids, attention_mask, token_type_ids, kv_cache, inputs_embeds))

    def head_outputs(self, hidden: torch.Tensor) -> EncoderOutput:
        """The head applied to last-layer states ``hidden`` (B, T, C)."""
        out = EncoderOutput(hidden_states=hidden)
        if self.pooler is not None:
            out.pooled = self.pooler(hidden)
        if self.mlm_head is not None:
            out.logits = self.mlm_head(hidden)
        if self.nsp_head is not None:
            out.nsp_logits = self.nsp_head(out.pooled)
        if self.config.head == "sequence_classification":
            out.logits = self.classifier(out.pooled)
        elif self.config.head == "token_classification":
            out.logits = self.classifier(hidden)
        return out

    def _check_inputs(self, shape: tuple[int, int], attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None, extra: int) -> None:
        """shape: (B, T) of the tokens; extra: leading keys in the cache (a prefix) the mask also covers."""
        B, T = shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                             "truncate the input")
        for name, t, want in (("attention_mask", attention_mask, (B, extra + T)),
                              ("token_type_ids", token_type_ids, shape)):
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"{name} must be (batch, {'extra + ' if extra and t is attention_mask else ''}"
                                 f"seq) = {want}, got {tuple(t.shape)}")
        if token_type_ids is not None and token_type_ids.numel() and int(token_type_ids.max()) >= \
                self.config.type_vocab_size:
            raise ValueError(f"token_type_ids hold {int(token_type_ids.max())}, but type_vocab_size="
                             f"{self.config.type_vocab_size}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average of the real tokens' states (sentence-transformers' mean pooling).

    Args:
        hidden: (B, T, C); attention_mask: (B, T) 1 for real tokens, or None.
    Returns:
        (B, C).
    """
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


__all__ = ["Encoder", "EncoderBlock", "EncoderOutput", "mean_pool"]
