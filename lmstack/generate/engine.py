"""The decoding engine: prefill a prompt, then advance one token at a time on a static KV cache.

The engine knows nothing about decoding strategies or tokenizers; search.py drives it. A model kind
plugs in by providing an engine with ``prefill``, ``step`` and ``reorder`` (an encoder-decoder engine
will encode once and step its decoder). Shapes: B rows, T prompt length, V vocabulary.
"""

import torch
from torch import nn

from lmstack.kernels.fused_step import FusedDecodeStep, fused_step_blocker
from lmstack.nn.kv_cache import StaticKVCache


class CausalLMEngine:
    """Runs a decoder-only model (``hidden_states`` + ``lm_head``) over left-padded rows.

    Position ids follow transformers' generation: ``cumsum(mask) - 1`` (pads get 1), so a left-padded
    row is numbered from its first real token. Only the last position goes through the LM head.

    Args:
        model: a Decoder (anything with ``config``, ``hidden_states`` and ``lm_head``).
        input_ids: (B, T) prompt ids, left-padded where rows differ in length.
        attention_mask: (B, T) 1 for real tokens, 0 for padding; None means no padding.
        max_new_tokens: the cache is sized T + max_new_tokens once, never reallocated.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int) -> None:
        B, T = input_ids.shape
        self.model = model
        # Each model kind makes its own cache (a transformed model may reserve slots of its own).
        new_cache = getattr(model, "new_cache", None) or (lambda *shape: StaticKVCache.for_model(model, *shape))
        self.cache = new_cache(B, T + max_new_tokens)
        self.input_ids = input_ids
        # Without padding no mask is passed at all, so attention takes its mask-free fast path.
        self.mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            self.mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=input_ids.device)
            self.mask[:, :T] = attention_mask
        if attention_mask is None:
            self.prompt_positions = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            self.prompt_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        self.next_position = self.prompt_positions[:, -1:] + 1  # (B, 1)
        # Tokens fed so far: the mask's columns. (The cache may hold more slots: a prompt-learning
        # transform's virtual tokens, which it masks itself.)
        self.fed = 0
        # Models opted in to the CPU decoding kernels take one fused C++ call per step where they can.
        self.fused_step = FusedDecodeStep(model) if fused_step_blocker(model, B) is None else None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Run the prompt; return next-token logits (B, V) in float32."""
        T = self.input_ids.shape[1]
        mask = self.mask[:, :T] if self.mask is not None else None
        hidden = self.model.hidden_states(self.input_ids, attention_mask=mask, position_ids=self.prompt_positions,
                                          kv_cache=self.cache)
        self.fed = T
        return self.model.lm_head(hidden[:, -1]).float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, tokens: (B,); return the next logits (B, V) in float32."""
        self.fed += 1
        if self.fused_step is not None:
            logits = self.fused_step(tokens, self.next_position, self.cache, self.mask)
            self.next_position = self.next_position + 1
            return logits
        mask = self.mask[:, :self.fed] if self.mask is not None else None
        hidden = self.model.hidden_states(tokens[:, None], attention_mask=mask, position_ids=self.next_position,
                                          kv_cache=self.cache)
        self.next_position = self.next_position + 1
        return self.model.lm_head(hidden[:, -1]).float()

    @torch.inference_mode()
    def reorder(self, rows: torch.Tensor) -> None:
        """Continue from rows ``rows`` (B,) of the current batch (beam search's surviving beams)."""
        self.cache.reorder(rows)
        self.next_position = self.next_position[rows]
        if self.mask is not None:
            self.mask = self.mask[rows]


class Seq2SeqEngine:
    """Runs an encoder-decoder (``encode``, ``cross_kv``, ``decode``): the source is encoded once, its
    cross-attention keys/values computed once, then the decoder steps on its own static cache.

    Args:
        model: an EncoderDecoder.
        input_ids: (B, S) source ids (right-padded: relative positions make padding side irrelevant
            to the encoder, and the mask hides the pads).
        attention_mask: (B, S) 1 for real tokens, 0 for padding; None means no padding.
        decoder_input_ids: (B, T0) the decoder's start, normally the decoder start token alone.
        max_new_tokens: the decoder cache is sized T0 + max_new_tokens.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 decoder_input_ids: torch.Tensor, max_new_tokens: int) -> None:
        self.model = model
        self.source_mask = attention_mask
        self.decoder_input_ids = decoder_input_ids
        with torch.inference_mode():
            self.cross = model.cross_kv(model.encode(input_ids, attention_mask))
        self.cache = model.new_cache(input_ids.shape[0], decoder_input_ids.shape[1] + max_new_tokens)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Run the decoder start; return next-token logits (B, V) in float32."""
        return self._decode(self.decoder_input_ids)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, tokens: (B,); return the next logits (B, V) in float32."""
        return self._decode(tokens[:, None])

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.decode(ids, self.cross, self.source_mask, self.cache)[:, -1].float()

    @torch.inference_mode()
    def reorder(self, rows: torch.Tensor) -> None:
        """Continue from rows ``rows`` (B,): the decoder cache, cross keys/values and mask follow."""
        self.cache.reorder(rows)
        self.cross = [(k[rows], v[rows]) for k, v in self.cross]
        if self.source_mask is not None:
            self.source_mask = self.source_mask[rows]
