"""Denoising pretraining objectives: masked LM (+ next-sentence prediction) for encoders and span
corruption for encoder-decoders. Batches come from ``lmstack.data.collate``; each objective is
``objective(model, batch) -> (loss, metrics)`` and scores held-out batches with ``evaluate``.
"""

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.train.objectives import IGNORE_INDEX, evaluating, labelled_items


class MaskedLMObjective:
    """Cross-entropy on the masked positions (plus NSP cross-entropy when the batch has pair labels).

    Only the scored positions go through the vocabulary projection, which is most of the head's cost.
    The model needs an ``mlm_head`` (head "masked_lm" or "pretraining"; NSP needs "pretraining").
    """

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        mlm_loss, nsp_loss, stats = self._losses(model, batch)
        loss = mlm_loss if nsp_loss is None else mlm_loss + nsp_loss
        return loss, {"tokens": stats["scored"]}

    def _losses(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        hidden = model.hidden_states(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX
        logits = model.mlm_head(hidden[scored])  # (N, V): only the masked positions
        targets = labels[scored]
        mlm_loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(1, targets.numel())
        stats = {"scored": int(targets.numel()), "mlm_correct": int((logits.argmax(-1) == targets).sum())}
        nsp_loss = None
        if "next_sentence_label" in batch:
            if model.nsp_head is None:
                raise ValueError("next-sentence labels need a model with an NSP head (head='pretraining')")
            nsp_logits = model.nsp_head(model.pooler(hidden))
            nsp_loss = F.cross_entropy(nsp_logits.float(), batch["next_sentence_label"])
            stats["nsp_correct"] = int((nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum())
            stats["pairs"] = int(nsp_logits.shape[0])
        return mlm_loss, nsp_loss, stats

    def evaluate(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Held-out masked-LM loss (nats per masked token), its perplexity and accuracy; NSP accuracy."""
        nats, totals = 0.0, {"scored": 0, "mlm_correct": 0, "nsp_correct": 0, "pairs": 0}
        with evaluating(model):
            for batch in batches:
                mlm_loss, _, stats = self._losses(model, batch)
                nats += float(mlm_loss) * stats["scored"]
                for key, value in stats.items():
                    totals[key] += value
        if not totals["scored"]:
            return {}
        loss = nats / totals["scored"]
        out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
               "eval_mlm_accuracy": totals["mlm_correct"] / totals["scored"]}
        if totals["pairs"]:
            out["eval_nsp_accuracy"] = totals["nsp_correct"] / totals["pairs"]
        return out


class SpanCorruptionObjective:
    """Teacher-forced cross-entropy of an encoder-decoder on span-corruption targets."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        labels = batch["labels"]
        logits = model(batch["input_ids"], batch.get("attention_mask"), model.shift_right(labels))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return loss, {"tokens": labelled_items(labels)}

    def loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Labelled items of ``batch`` (the loss is their mean; the Trainer weighs micro-batches by them)."""
        return labelled_items(batch["labels"])

    def evaluate(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Held-out target loss (nats per target token), perplexity and token accuracy."""
        nats, tokens, correct = 0.0, 0, 0
        with evaluating(model):
            for batch in batches:
                labels = batch["labels"]
                logits = model(batch["input_ids"], batch.get("attention_mask"), model.shift_right(labels)).float()
                scored = labels != IGNORE_INDEX
                nats += float(F.cross_entropy(logits[scored], labels[scored], reduction="sum"))
                tokens += int(scored.sum())
                correct += int((logits.argmax(-1)[scored] == labels[scored]).sum())
        if not tokens:
            return {}
        return {"eval_loss": nats / tokens, "eval_ppl": math.exp(min(nats / tokens, 50.0)),
                "eval_accuracy": correct / tokens}
