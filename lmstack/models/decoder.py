"""The decoder-only transformer: GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE and Qwen3-MoE are
all this class with another config.

    input_ids (B, T)
      -> embed_tokens (+ embed_positions when learned/sinusoidal)          (B, T, C)
      -> n_layers x Block:  x = x + attn(attn_norm(x));  x = x + mlp(mlp_norm(x))
         (mlp: a dense MLP, or a mixture of experts on the layers config.moe names)
      -> norm -> lm_head                                                   (B, T, vocab)

Module names follow Hugging Face's (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj,
embed_tokens, layers.{i}, norm, lm_head), so LoRA targets, weight maps and parallel plans line up.
Shapes: B batch, T time, C width.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.models.config import DecoderConfig
from lmstack.nn.attention import Attention
from lmstack.nn.embedding import embed_inputs
from lmstack.nn.kv_cache import StaticKVCache, packs_sequences
from lmstack.nn.masks import AttentionMask, packed_segments
from lmstack.nn.mlp import make_mlp
from lmstack.nn.moe import MoE, Routing, TopKRouter
from lmstack.nn.norms import RMSNorm, make_norm
from lmstack.nn.positions import LearnedPositions, RotaryEmbedding, SinusoidalPositions, alibi_slopes


class Block(nn.Module):
    """One pre-norm transformer layer: attention then feed-forward, each wrapped in a residual."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = config.window_for_layer(layer_idx)
        self.attn_norm = make_norm(config.norm, config.dim, config.norm_eps, config.norm_bias)
        self.attn = Attention(config.dim, config.n_heads, config.n_kv_heads, config.head_dim,
                              qkv_bias=config.qkv_bias, out_bias=config.out_bias, dropout=config.dropout,
                              qk_norm_eps=config.norm_eps if config.qk_norm else None)
        self.mlp_norm = make_norm(config.norm, config.dim, config.norm_eps, config.norm_bias)
        self.mlp = self._make_feed_forward(config, layer_idx)
        self.dropout = config.dropout

    @staticmethod
    def _make_feed_forward(config: DecoderConfig, layer_idx: int) -> nn.Module:
        """The layer's MLP, or its mixture of experts (experts of the same MLP kind)."""
        if not config.is_moe_layer(layer_idx):
            return make_mlp(config.mlp, config.dim, config.ffn_dim, config.activation, config.mlp_bias)
        m = config.moe
        return MoE(config.dim, m.expert_dim, m.num_experts, m.top_k, mlp=config.mlp, activation=config.activation,
                   bias=config.mlp_bias, score=m.score, normalize_top_k=m.normalize_top_k, noisy=m.noisy_gating,
                   capacity_factor=m.capacity_factor, shared_expert_dim=m.shared_expert_dim,
                   shared_expert_gate=m.shared_expert_gate, jitter=m.router_jitter)

    def forward(self, x: torch.Tensor, mask: AttentionMask,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, kv_cache=None,
                return_routing: bool = False):
        """x: (B, T, C) -> (B, T, C); with ``return_routing``, (x, the MoE layer's Routing or None)."""
        mask = mask.with_window(self.sliding_window)
        x = x + self._dropout(self.attn(self.attn_norm(x), mask, rotary, kv_cache, self.layer_idx))
        if not return_routing:
            return x + self._dropout(self.mlp(self.mlp_norm(x)))
        routing = None
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(self.mlp_norm(x), return_routing=True)
        else:
            y = self.mlp(self.mlp_norm(x))
        return x + self._dropout(y), routing

    def _dropout(self, y: torch.Tensor) -> torch.Tensor:
        # Checked here rather than through an nn.Dropout so inference pays nothing for it (decode hot path).
        return F.dropout(y, self.dropout, training=True) if self.training and self.dropout > 0 else y


class Decoder(nn.Module):
    """Decoder-only language model driven by a DecoderConfig.

    Attributes:
        config: the DecoderConfig it was built from.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.embed_positions = self._make_absolute_positions(config)
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, config.max_seq_len)
                       if config.position == "rope" else None)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config.norm, config.dim, config.norm_eps, config.norm_bias)
        if config.num_scores is None:
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        else:  # a reward / value model: scores per position (HF's name for this head)
            self.score = nn.Linear(config.dim, config.num_scores, bias=False)
        self.tie_weights()
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    @staticmethod
    def _make_absolute_positions(config: DecoderConfig) -> nn.Module | None:
        if config.position == "learned":
            return LearnedPositions(config.max_seq_len, config.dim)
        if config.position == "sinusoidal":
            return SinusoidalPositions(config.dim)
        return None

    def tie_weights(self) -> None:
        """Make lm_head share the embedding matrix when the config ties them (call again after loading)."""
        if self.config.tie_embeddings and self.config.num_scores is None:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std) weights, zero biases, unit norms, and residual output
        projections scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith(("o_proj", "down_proj", "fc_out"))
                nn.init.normal_(module.weight, std=std / math.sqrt(2 * self.config.n_layers) if is_residual_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LearnedPositions):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, TopKRouter):
                nn.init.normal_(module.weight, std=std)
                if module.noise_weight is not None:  # no noise to begin with (Shazeer et al.)
                    nn.init.zeros_(module.noise_weight)

    def hidden_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, kv_cache=None,
                      inputs_embeds: torch.Tensor | None = None, return_routing: bool = False):
        """Final normalised hidden states (B, T, C) (and, with ``return_routing``, the list of the MoE
        layers' Routing); see ``forward`` for the arguments."""
        start = kv_cache.length if kv_cache is not None else 0
        x = embed_inputs(self.embed_tokens, input_ids, inputs_embeds)
        B, T = x.shape[:2]
        if packs_sequences(kv_cache):
            self._check_packed((B, T), attention_mask, position_ids)
        else:
            self._check_inputs((B, T), attention_mask, start)
        if position_ids is None:
            # Same default as Hugging Face: cache slots, whatever the padding (generation passes positions).
            position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids).to(x.dtype)
        if self.training and self.config.dropout > 0:
            x = F.dropout(x, self.config.dropout, training=True)
        mask = AttentionMask(causal=True, key_padding=attention_mask, q_start=start,
                             alibi_slopes=self._alibi_slopes(x.device), segments=packed_segments(attention_mask))
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        routings: list[Routing] = []
        for layer in self.layers:
            if return_routing:
                x, routing = layer(x, mask, rotary, kv_cache, return_routing=True)
                routings += [routing] if routing is not None else []
            else:
                x = layer(x, mask, rotary, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return (self.norm(x), routings) if return_routing else self.norm(x)

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache=None,
                inputs_embeds: torch.Tensor | None = None, return_routing: bool = False,
                return_hidden: bool = False):
        """Next-token logits (or, with ``config.num_scores``, the score head's outputs).

        Args:
            input_ids: (B, T) token ids (None when ``inputs_embeds`` is given).
            attention_mask: (B, cached + T), 1 for real tokens and 0 for padding; None means no padding.
                Rows that pack several sequences number them 1, 2, ... (segment ids): each token attends
                only within its own sequence (pass ``position_ids`` restarting at each, too).
            position_ids: (B, T) positions; default: cache slots ``cached .. cached + T - 1``.
            kv_cache: a KVCache holding the earlier tokens; it is advanced by T.
            inputs_embeds: (B, T, C) token embeddings to use instead of ``embed_tokens(input_ids)`` (soft
                prompts, other modalities).
            return_routing: also return where each mixture-of-experts layer sent the tokens (a list of
                ``lmstack.nn.moe.Routing``, one per MoE layer; empty for a dense model), for the auxiliary
                losses and router statistics.
            return_hidden: return ``hidden_states`` (B, T, C) instead of the head's outputs: how a wrapper that
                runs only ``forward`` (DDP, FSDP) lets the objective fuse the head into the loss.
        Returns:
            logits: (B, T, vocab_size); a score model: (B, T, num_scores). With ``return_routing``:
            (logits, routings).
        """
        out = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, inputs_embeds, return_routing)
        if return_hidden:
            return out
        hidden, routings = out if return_routing else (out, None)
        head = self.lm_head if self.config.num_scores is None else self.score
        return (head(hidden), routings) if return_routing else head(hidden)

    def _alibi_slopes(self, device: torch.device) -> torch.Tensor | None:
        return alibi_slopes(self.config.n_heads).to(device) if self.config.position == "alibi" else None

    def _check_inputs(self, shape: tuple[int, int], attention_mask: torch.Tensor | None, start: int) -> None:
        """shape: (B, T) of this call's tokens; start: slots already in the cache."""
        total = start + shape[1]
        limit = self.config.context_limit
        if limit is not None and total > limit:
            raise ValueError(f"sequence of {total} tokens exceeds the context length max_seq_len={limit}")
        if attention_mask is not None and tuple(attention_mask.shape) != (shape[0], total):
            raise ValueError(f"attention_mask must be (batch, cached + seq) = {(shape[0], total)}, "
                             f"got {tuple(attention_mask.shape)}")

    def _check_packed(self, shape: tuple[int, int], attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None) -> None:
        """A packed serving row: one row, explicit positions, each within the context."""
        if shape[0] != 1 or attention_mask is not None or position_ids is None:
            raise ValueError("a packed cache takes one row of tokens with position_ids and no attention_mask")
        limit = self.config.context_limit
        if limit is not None and shape[1] and int(position_ids.max()) >= limit:
            raise ValueError(f"position {int(position_ids.max())} exceeds the context length max_seq_len={limit}")

    def new_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        """A static KV cache for ``batch_size`` rows of up to ``max_len`` tokens, shaped for this model."""
        return StaticKVCache.for_model(self, batch_size, max_len)

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied matrices counted once)."""
        return sum(p.numel() for p in self.parameters())
