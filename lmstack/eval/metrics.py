"""Classification and tagging metrics: accuracy, macro precision/recall/F1, entity-level F1.

Entity F1 follows seqeval's default (CoNLL-style) chunking: an entity is a maximal run that starts at a
B- tag (or at an I- tag whose type differs from the tag before it) and continues over I- tags of the same
type; a predicted entity counts only if its type, start and end all match a true one (exact span).
"""


def accuracy(predictions: list, references: list) -> float:
    """Share of positions where prediction == reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(p == r for p, r in zip(predictions, references)) / max(1, len(references))


def macro_precision_recall_f1(predictions: list[int], references: list[int], n_classes: int) -> dict[str, float]:
    """Unweighted means over classes of per-class precision, recall and F1 (a class with no predicted or
    no true items scores 0 there, as scikit-learn's zero_division=0)."""
    precisions, recalls, f1s = [], [], []
    for c in range(n_classes):
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        predicted = sum(p == c for p in predictions)
        actual = sum(r == c for r in references)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    n = max(1, n_classes)
    return {"macro_precision": sum(precisions) / n, "macro_recall": sum(recalls) / n, "macro_f1": sum(f1s) / n}


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if kind else ("I", prefix)  # a bare "PER" reads as inside a PER entity


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """{(type, start, end inclusive)} of the entities in one BIO-tagged sentence."""
    spans, start, kind = set(), None, ""
    for i, tag in enumerate([*tags, "O"]):  # the trailing O closes an entity at the end
        prefix, tag_kind = _split_tag(tag)
        ends = start is not None and (prefix in ("B", "O") or tag_kind != kind)
        if ends:
            spans.add((kind, start, i - 1))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, tag_kind
    return spans


def entity_f1(predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over exactly matching entity spans, summed over sentences."""
    tp = n_pred = n_true = 0
    for pred, ref in zip(predictions, references, strict=True):
        p, r = entity_spans(pred), entity_spans(ref)
        tp += len(p & r)
        n_pred += len(p)
        n_true += len(r)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}
