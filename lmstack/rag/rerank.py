"""Re-rankers: score a first stage's candidates again, more carefully, and reorder them.

    reranker = CrossEncoder("path/to/ms-marco-MiniLM-L-6-v2")     # a BERT sequence-classification checkpoint
    reranker.score("how do I resume?", ["Pass --resume ...", "Boil the pasta ..."])   # (2,) relevance
    index.search("how do I resume?", k=5, mode="bm25", rerank=reranker)            # top 50 rescored, best 5 kept

A cross-encoder reads the query and the passage together ([CLS] query [SEP] passage [SEP], segment ids
0 then 1) and its classification head says how relevant the pair is: slower than comparing two
precomputed embeddings, so it only sees the few dozen candidates a fast retriever found. Scores are
sentence-transformers' ``CrossEncoder.predict``: the head's logit through a sigmoid when there is one label
(the activation named in ``config.json``'s ``sentence_transformers.activation_fn`` when given).
``EmbeddingReranker`` re-scores by cosine similarity under a (usually larger) bi-encoder instead, for
candidates that a lexical stage (BM25) found.
"""

import os
from pathlib import Path

import torch

from lmstack.errors import ConfigError
from lmstack.nn.packed_linear import pack_linears_
from lmstack.rag.embeddings import _read_json as _read_json_file

_ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Identity": lambda x: x, "Tanh": torch.tanh}


class CrossEncoder:
    """Relevance of (query, passage) pairs from a BERT sequence-classification checkpoint.

    Args:
        path: a checkpoint directory (config.json with BertForSequenceClassification, weights, tokenizer).
        max_length: pairs longer than this are cut, the longer text first (transformers' "longest_first");
            default: the tokenizer's model_max_length, at most the position table.
        packed: on CPU, oneDNN-packed linears (as ``SentenceEncoder``); False keeps the plain modules.
    """

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 max_length: int | None = None, packed: bool = True) -> None:
        from lmstack.checkpoints.hf import load_hf
        from lmstack.models.encoder import Encoder
        from lmstack.tokenizers import load_tokenizer

        path = Path(path)
        self.model = load_hf(path, device=device).eval()
        if not isinstance(self.model, Encoder) or self.model.config.head != "sequence_classification":
            raise ConfigError(f"{path}: a cross-encoder is a BERT sequence-classification checkpoint "
                              f"(BertForSequenceClassification), got {type(self.model).__name__} "
                              f"with head {getattr(self.model.config, 'head', None)!r}")
        if packed:
            pack_linears_(self.model)  # CPU float32 linears only
        self.tokenizer = load_tokenizer(path)
        self.device = torch.device(device)
        config = _read_json(path / "config.json")
        self.activation = _activation(config, len(self.model.config.labels or [0]), path)
        tokenizer_limit = (_read_json(path / "tokenizer_config.json") or {}).get("model_max_length")
        limits = [n for n in (max_length, tokenizer_limit if isinstance(tokenizer_limit, int) else None) if n]
        self.max_length = min([*limits, self.model.config.max_seq_len])

    @torch.inference_mode()
    def score(self, query: str, passages: list[str], batch_size: int = 32) -> torch.Tensor:
        """(len(passages),) float32 relevance of each passage to ``query``; for several labels, (N, labels)."""
        if not passages:
            return torch.empty(0)
        out = []
        for start in range(0, len(passages), batch_size):
            batch = passages[start:start + batch_size]
            encoded = self.tokenizer.encode_batch([query] * len(batch), batch, padding=True, truncation=True,
                                                  max_length=self.max_length)
            ids, types, mask = (torch.tensor(encoded[key], device=self.device)
                                for key in ("input_ids", "token_type_ids", "attention_mask"))
            logits = self.model(ids, mask, types).logits.float()
            out.append(self.activation(logits).cpu())
        scores = torch.cat(out)
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def rerank(self, query: str, passages: list[str]) -> list[float]:
        scores = self.score(query, passages)
        if scores.dim() != 1:
            raise ConfigError("re-ranking needs a cross-encoder with one relevance label")
        return scores.tolist()


class EmbeddingReranker:
    """Re-scores candidates by cosine similarity with the query under a SentenceEncoder."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def rerank(self, query: str, passages: list[str]) -> list[float]:
        if not passages:
            return []
        vectors = self.encoder.encode([query, *passages])
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return (vectors[1:] @ vectors[0]).tolist()


def rerank_order(scores: list[float]) -> list[int]:
    """Positions of ``scores`` best first (a stable sort: ties keep the first stage's order)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def _activation(config: dict, num_labels: int, path: Path):
    name = ((config or {}).get("sentence_transformers") or {}).get("activation_fn")
    if name is None:
        return torch.sigmoid if num_labels == 1 else _ACTIVATIONS["Identity"]
    short = str(name).rsplit(".", 1)[-1]
    if not str(name).startswith("torch.") or short not in _ACTIVATIONS:
        raise ConfigError(f"{path}/config.json names the activation {name!r}; lmstack knows "
                          f"{', '.join('torch.nn.' + n for n in _ACTIVATIONS)}")
    return _ACTIVATIONS[short]


def _read_json(path: Path) -> dict | None:
    value = _read_json_file(path)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
