"""Evaluation metrics."""

from lmstack.eval.metrics import accuracy, entity_f1, entity_spans, macro_precision_recall_f1

__all__ = ["accuracy", "entity_f1", "entity_spans", "macro_precision_recall_f1"]
