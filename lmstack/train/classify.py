"""Classification objectives for fine-tuning encoders: one label per sequence, or one per token.

Both are cross-entropy over the head's logits (token positions labelled IGNORE_INDEX are not scored);
``evaluate`` reports loss, accuracy and macro precision/recall/F1, plus entity-level F1 over BIO tags
for token classification.
"""

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.eval.metrics import accuracy, entity_f1, macro_precision_recall_f1
from lmstack.train.objectives import IGNORE_INDEX, evaluating, labelled_items


class ClassificationObjective:
    """Sequence classification (labels (B,)) or token classification (labels (B, T)).

    Args:
        labels: the class names (index = class id); BIO names enable entity F1 for token tasks.
    """

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return loss, {"tokens": labelled_items(labels)}

    def loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Labelled items of ``batch`` (the loss is their mean; the Trainer weighs micro-batches by them)."""
        return labelled_items(batch["labels"])

    def predict(self, model: nn.Module, batches: Iterable[dict]) -> tuple[list, list, float, int]:
        """(predictions, references, summed loss, scored items) in eval mode; token tasks give one list per row."""
        with evaluating(model):
            return self._predict(model, batches)

    def _predict(self, model: nn.Module, batches: Iterable[dict]) -> tuple[list, list, float, int]:
        preds, refs, nats, n = [], [], 0.0, 0
        for batch in batches:
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.float()
            labels = batch["labels"]
            nats += float(F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                                          reduction="sum"))
            n += labelled_items(labels)
            guess = logits.argmax(-1)
            if labels.dim() == 1:
                preds += guess.tolist()
                refs += labels.tolist()
            else:
                for g, y in zip(guess, labels):
                    keep = y != IGNORE_INDEX
                    preds.append(g[keep].tolist())
                    refs.append(y[keep].tolist())
        return preds, refs, nats, n

    def evaluate(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        preds, refs, nats, n = self.predict(model, batches)
        if not n:
            return {}
        flat_p = [x for row in preds for x in row] if preds and isinstance(preds[0], list) else preds
        flat_r = [x for row in refs for x in row] if refs and isinstance(refs[0], list) else refs
        out = {"eval_loss": nats / n, "eval_accuracy": accuracy(flat_p, flat_r)}
        out.update({f"eval_{k}": v for k, v in macro_precision_recall_f1(flat_p, flat_r, len(self.labels)).items()})
        if preds and isinstance(preds[0], list) and any(name.startswith(("B-", "I-")) for name in self.labels):
            named = lambda rows: [[self.labels[i] for i in row] for row in rows]  # noqa: E731
            out.update({f"eval_{k}": v for k, v in entity_f1(named(preds), named(refs)).items()})
        return out
