"""Task heads: over an encoder's hidden states (masked LM, next-sentence prediction, classification), and
the score head that turns a decoder into a reward or value model (``with_score_head``).

Each head is a small module that an Encoder attaches according to ``EncoderConfig.head``; the math
follows BERT (Devlin et al. 2018, https://arxiv.org/abs/1810.04805). Shapes: B batch, T time, C width.
"""

import torch
from torch import nn

from lmstack.nn.mlp import get_activation


class Pooler(nn.Module):
    """BERT's sentence summary: ``tanh(dense(h[:, 0]))`` over the first ([CLS]) position."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, C) -> (B, C)."""
        return torch.tanh(self.dense(hidden[:, 0]))


class MaskedLMHead(nn.Module):
    """Predicts the token at each position: ``decoder(norm(act(dense(h))))`` with a vocabulary bias.

    ``decoder.weight`` is tied to the token embeddings when the config says so (the Encoder ties it).
    """

    def __init__(self, dim: int, vocab_size: int, activation: str, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = get_activation(activation)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., C) -> logits (..., vocab). Pass only the masked positions to save work."""
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class ClassificationHead(nn.Module):
    """Dropout then a linear map to ``num_labels`` scores, applied to pooled or per-token states."""

    def __init__(self, dim: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., num_labels)."""
        return self.proj(self.dropout(x))


__all__ = ["ClassificationHead", "MaskedLMHead", "Pooler"]


def with_score_head(model: nn.Module, num_scores: int = 1) -> nn.Module:
    """Turn a decoder language model into a score model in place: the LM head is replaced by a new
    ``score`` linear of ``num_scores`` outputs per position (a reward model: 1; HF ...ForSequenceClassification).

    The new head is drawn from N(0, init_std) and does not share the embedding matrix."""
    config = model.config
    if not hasattr(model, "lm_head") or getattr(config, "num_scores", None) is not None:
        raise ValueError(f"{type(model).__name__} has no LM head to replace with a score head")
    weight = model.lm_head.weight
    del model.lm_head
    config.num_scores, config.tie_embeddings = num_scores, False
    model.score = nn.Linear(config.dim, num_scores, bias=False, device=weight.device, dtype=weight.dtype)
    nn.init.normal_(model.score.weight, std=config.init_std)
    return model


def last_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's scores at its last real token, as transformers' sequence classification pools them.

    scores: (B, T, S); attention_mask: (B, T) or None. Returns (B, S)."""
    if attention_mask is None:
        return scores[:, -1]
    positions = torch.arange(scores.shape[1], device=scores.device)
    last = (positions * (attention_mask != 0)).argmax(-1)
    return scores[torch.arange(scores.shape[0], device=scores.device), last]
