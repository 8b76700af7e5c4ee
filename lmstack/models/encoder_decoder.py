"""The encoder-decoder transformer (T5, Raffel et al. 2020, https://arxiv.org/abs/1910.10683).

    input_ids (B, S) -> embed_tokens -> encoder: n_layers x [x += attn(norm(x)); x += mlp(norm(x))] -> norm
                                                                                         = memory (B, S, C)
    decoder_input_ids (B, T) -> embed_tokens -> decoder: n_decoder_layers x
        [x += causal attn(norm(x)); x += cross_attn(norm(x), memory); x += mlp(norm(x))] -> norm
      -> (x * C**-0.5 when scale_decoder_output) -> lm_head                                   (B, T, vocab)

Attention scores are not scaled by 1/sqrt(D) (T5 folds it into the initialisation) and carry a
learned relative-position bias, computed once per stack (bidirectional buckets in the encoder,
causal ones in the decoder) and shared by its layers. Cross-attention keys/values come from the
encoder output once per generation (``cross_kv``) and are reused at every decoding step.
Shapes: B batch, S source length, T target length, C width, H heads, D head dim.
"""

import torch
from torch import nn

from lmstack.models.config import EncoderDecoderConfig
from lmstack.nn.attention import Attention
from lmstack.nn.kv_cache import StaticKVCache
from lmstack.nn.masks import AttentionMask
from lmstack.nn.mlp import GatedMLP, MLP, make_mlp
from lmstack.nn.norms import RMSNorm
from lmstack.nn.positions import RelativePositionBias

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: keys, values (B, H, S, D)


class StackBlock(nn.Module):
    """One pre-norm layer of either stack; decoder layers also attend to the encoder output."""

    def __init__(self, config: EncoderDecoderConfig, layer_idx: int, cross: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        c = config
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c.dim, c.n_heads, head_dim=c.head_dim, dropout=c.dropout, scale=1.0)
        self.cross_attn_norm = RMSNorm(c.dim, c.norm_eps) if cross else None
        self.cross_attn = Attention(c.dim, c.n_heads, head_dim=c.head_dim, dropout=c.dropout, scale=1.0) \
            if cross else None
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = make_mlp(c.mlp, c.dim, c.ffn_dim, c.activation, bias=False)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, mask: AttentionMask, kv_cache: StaticKVCache | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cross_mask: AttentionMask | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        x = x + self.dropout(self.attn(self.attn_norm(x), mask, kv_cache=kv_cache, layer_idx=self.layer_idx))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), cross_mask, kv=cross_kv))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) half of the model."""

    def __init__(self, config: EncoderDecoderConfig, n_layers: int, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        self.relative_bias = RelativePositionBias(config.relative_buckets, config.relative_max_distance,
                                                  config.n_heads, bidirectional=not is_decoder)
        self.layers = nn.ModuleList(StackBlock(config, i, cross=is_decoder) for i in range(n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None, kv_cache: StaticKVCache | None = None,
                cross_kv: CrossKV | None = None, memory_padding: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C) embeddings; padding: (B, T) bool real-token mask of the keys, or None -> (B, T, C)."""
        start = kv_cache.length if kv_cache is not None else 0
        T = x.shape[1]
        q_pos = torch.arange(start, start + T, device=x.device)
        k_pos = torch.arange(start + T, device=x.device)
        mask = AttentionMask(causal=self.is_decoder, key_padding=padding, q_start=start,
                             position_bias=self.relative_bias(q_pos, k_pos))
        cross_mask = AttentionMask(causal=False, key_padding=memory_padding)
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, kv_cache, cross_kv[i] if cross_kv is not None else None, cross_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.dropout(self.norm(x))


class EncoderDecoder(nn.Module):
    """T5-style sequence-to-sequence model driven by an EncoderDecoderConfig.

    Module names: embed_tokens (shared by both stacks), encoder.*, decoder.*, lm_head.
    """

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.encoder = Stack(config, config.n_layers, is_decoder=False)
        self.decoder = Stack(config, config.n_decoder_layers, is_decoder=True)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T5's initialisation: each projection's std is init_std / sqrt(its fan-in), so that with
        unscaled attention scores every activation starts at unit variance."""
        c, f = self.config, self.config.init_std
        nn.init.normal_(self.embed_tokens.weight, std=f)
        if not c.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=f)
        for module in self.modules():
            if isinstance(module, Attention):
                nn.init.normal_(module.q_proj.weight, std=f * (c.dim * c.head_dim) ** -0.5)
                nn.init.normal_(module.k_proj.weight, std=f * c.dim ** -0.5)
                nn.init.normal_(module.v_proj.weight, std=f * c.dim ** -0.5)
                nn.init.normal_(module.o_proj.weight, std=f * (c.n_heads * c.head_dim) ** -0.5)
            elif isinstance(module, (MLP, GatedMLP)):
                for name, linear in module.named_children():
                    fan_in = c.ffn_dim if name in ("fc_out", "down_proj") else c.dim
                    nn.init.normal_(linear.weight, std=f * fan_in ** -0.5)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.weight, std=f * c.dim ** -0.5)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, S); attention_mask: (B, S) 1 = real, 0 = padding -> memory (B, S, C)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        return self.encoder(self.embed_tokens(input_ids), _padding(attention_mask))

    def cross_kv(self, memory: torch.Tensor) -> CrossKV:
        """Each decoder layer's cross-attention keys and values of ``memory`` (B, S, C)."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]

    def decode(self, decoder_input_ids: torch.Tensor, cross_kv: CrossKV, attention_mask: torch.Tensor | None = None,
               kv_cache: StaticKVCache | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab) for decoder_input_ids (B, T), given the encoder's ``cross_kv``
        and its source attention_mask (B, S); kv_cache holds earlier decoder tokens and advances by T."""
        x = self.decoder(self.embed_tokens(decoder_input_ids), None, kv_cache, cross_kv, _padding(attention_mask))
        if self.config.scale_decoder_output:
            x = x * self.config.dim ** -0.5  # the tied embedding matrix is N(0, 1): rescale before reusing it
        return self.lm_head(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            input_ids: (B, S) source ids; attention_mask: (B, S) 1 = real, 0 = padding.
            decoder_input_ids: (B, T) target ids shifted right (start token first); see ``shift_right``.
        Returns:
            logits: (B, T, vocab_size).
        """
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (build it from labels with shift_right)")
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.cross_kv(memory), attention_mask)

    def new_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        """An empty self-attention cache for the decoder."""
        p = self.embed_tokens.weight
        c = self.config
        return StaticKVCache(c.n_decoder_layers, batch_size, max_len, c.n_heads, c.head_dim, p.dtype, p.device)

    def shift_right(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Decoder inputs from targets (B, T): the start token, then labels[:, :-1]; ignored
        positions become padding."""
        start = self.config.decoder_start_token_id
        if start is None:
            raise ValueError("decoder_start_token_id is not set in the config")
        shifted = labels.new_full(labels.shape, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == ignore_index, self.config.pad_token_id or 0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 0/1 mask -> bool key-padding mask, or None when nothing is padded (the fast path)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


__all__ = ["CrossKV", "EncoderDecoder", "Stack", "StackBlock"]
