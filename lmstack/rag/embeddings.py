"""Sentence embeddings from an encoder checkpoint (sentence-transformers' recipe: encoder, pooling, L2).

    from lmstack.rag import SentenceEncoder
    encoder = SentenceEncoder("path/to/all-MiniLM-L6-v2")
    vectors = encoder.encode(["A cat sits.", "A dog runs."])     # (2, 384), unit length
    vectors @ vectors.T                                          # cosine similarities

A sentence-transformers directory says how it pools (``1_Pooling/config.json``), whether it normalises
(a ``Normalize`` module in ``modules.json``) and its maximum length (``sentence_bert_config.json``);
a plain BERT directory gets mean pooling, normalisation and its position-table length.
"""

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmstack.errors import ConfigError
from lmstack.models.encoder import Encoder, mean_pool
from lmstack.nn.packed_linear import pack_linears_
from lmstack.tokenizers import load_tokenizer

POOLING_MODES = ("mean", "cls", "max")


class SentenceEncoder:
    """Turns texts into fixed-size vectors with an lmstack Encoder.

    Args:
        path: a checkpoint directory (config.json + safetensors + vocab.txt / tokenizer.json).
        device: where the model runs.
        pooling: "mean", "cls" or "max"; default from ``1_Pooling/config.json``, else "mean".
        normalize: L2-normalise the vectors; default from ``modules.json``, else True.
        max_length: longer texts are truncated to this many tokens; default from
            ``sentence_bert_config.json``, else the model's position table.
        packed: on CPU, run the linears through oneDNN with packed weights and GELU fused
            (``lmstack.nn.packed_linear``: the same vectors up to fp32 rounding, ~10% faster); False keeps
            the plain modules.
    """

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu", pooling: str | None = None,
                 normalize: bool | None = None, max_length: int | None = None, packed: bool = True) -> None:
        from lmstack.checkpoints.hf import load_hf

        path = Path(path)
        self.model = load_hf(path, device=device)
        if not isinstance(self.model, Encoder):
            raise ConfigError(f"{path}: sentence embeddings need an encoder checkpoint (BERT), got "
                              f"{type(self.model).__name__}")
        self.model.eval()
        if packed:
            pack_linears_(self.model)  # CPU float32 linears only
        self.tokenizer = load_tokenizer(path)
        self.device = torch.device(device)
        self.pooling = pooling or _read_pooling(path)
        if self.pooling not in POOLING_MODES:
            raise ConfigError(f"pooling={self.pooling!r} is not one of {list(POOLING_MODES)}")
        self.normalize = _reads_normalize(path) if normalize is None else normalize
        self.max_length = min(max_length or _read_max_length(path) or self.model.config.max_seq_len,
                              self.model.config.max_seq_len)

    @property
    def dim(self) -> int:
        return self.model.config.dim

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Embed ``texts``: (N, dim) float32 on CPU, rows in the order given.

        Every text is tokenized first; batches are then cut from the texts sorted by token count, so that
        little compute goes to padding.
        """
        if isinstance(texts, str):
            raise ConfigError("encode takes a list of texts; wrap a single text in a list")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        encoded = [self.token_ids(text) for text in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(texts), self.dim)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="embedding", disable=not progress, unit="batch"):
            rows = order[start:start + batch_size]
            out[rows] = self._embed_batch([encoded[i] for i in rows]).cpu()
        return out

    def token_ids(self, text: str) -> list[int]:
        """[CLS] ... [SEP] ids of ``text``, cut to ``max_length`` (the end token kept), as transformers truncates."""
        ids = self.tokenizer.encode(text)
        return ids if len(ids) <= self.max_length else ids[:self.max_length - 1] + ids[-1:]

    def _embed_batch(self, ids: list[list[int]]) -> torch.Tensor:
        """Right-pad one batch of token ids (padding is masked out of attention and pooling), embed, pool."""
        longest = max(len(row) for row in ids)
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids], device=self.device)
        ids = torch.tensor([row + [0] * (longest - len(row)) for row in ids], device=self.device)
        hidden = self.model.hidden_states(ids, mask, torch.zeros_like(ids))
        vectors = pool(hidden.float(), mask, self.pooling)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden: (B, T, C), attention_mask: (B, T) -> (B, C) by mean / first-token / max pooling."""
    if mode == "mean":
        return mean_pool(hidden, attention_mask)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(attention_mask[..., None] == 0, float("-inf")).amax(dim=1)
    raise ConfigError(f"pooling={mode!r} is not one of {list(POOLING_MODES)}")


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: (N, D), b: (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def _read_pooling(path: Path) -> str:
    config = _read_json(path / "1_Pooling" / "config.json") or {}
    for mode, key in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens"),
                      ("mean", "pooling_mode_mean_tokens")):
        if config.get(key):
            return mode
    return "mean"


def _reads_normalize(path: Path) -> bool:
    modules = _read_json(path / "modules.json")
    if modules is None:
        return True
    return any(str(m.get("type", "")).endswith("Normalize") for m in modules)


def _read_max_length(path: Path) -> int | None:
    config = _read_json(path / "sentence_bert_config.json") or {}
    return config.get("max_seq_length")
