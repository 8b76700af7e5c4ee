"""A model's input embeddings: from token ids, or given directly (soft prompts, other modalities)."""

import torch
from torch import nn


def embed_inputs(embed_tokens: nn.Embedding, input_ids: torch.Tensor | None,
                 inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C): ``embed_tokens(input_ids)`` for ids (B, T), or ``inputs_embeds`` (B, T, C) checked and
    returned as given. Exactly one of the two must be passed."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, C)")
    if inputs_embeds is None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        return embed_tokens(input_ids)
    width = embed_tokens.embedding_dim
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
        raise ValueError(f"inputs_embeds must be (batch, seq, {width}), got shape {tuple(inputs_embeds.shape)}")
    return inputs_embeds
