"""QuantizedEmbedding: an nn.Embedding whose table is held in a low-bit format (int8, int4, NF4).

    embedding = QuantizedEmbedding.from_embedding(model.embed_tokens, "int4", group_size=32)
    x = embedding(ids)        # (..., dim) fp32: only the looked-up rows are dequantised

The table is stored exactly as a ``QuantizedLinear`` of shape (vocab, dim) stores its weight (the same
tensors of ``lmstack.compress.formats``), so a tied LM head and the embedding can share one quantized
table, as llama.cpp's files do: ``QuantizedLinear.sharing(embedding)`` is that head. A lookup reads one row
per token, so the table's size is what quantizing it saves (SmolLM2's fp32 embedding is 113 MB of its
237 MB int8 checkpoint), not time. Lookups have no gradient (the codes are buffers).
"""

import torch
from torch import nn

from lmstack.compress import formats
from lmstack.compress.quantized_linear import QuantizedLinear, QuantizedTransform, check_shape


class QuantizedEmbedding(QuantizedTransform, nn.Module):
    """Holds ``scheme``'s tensors for a (num_embeddings, embedding_dim) table as buffers."""

    def dequantized_state(self) -> dict[str, torch.Tensor]:
        """The nn.Embedding state the codes stand for (``save_hf(..., dequantize=True)``)."""
        return {"weight": self.dequantize()}

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str, tensors: dict[str, torch.Tensor],
                 group_size: int | None = None) -> None:
        super().__init__()
        check_shape(scheme, embedding_dim, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.scheme, self.group_size = scheme, group_size
        for name, value in tensors.items():
            self.register_buffer(name, value)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: str, group_size: int | None = None) -> "QuantizedEmbedding":
        """Round-to-nearest codes of ``embedding.weight`` (rows = tokens, as a linear's output rows)."""
        table = QuantizedLinear.from_linear(_as_linear(embedding), scheme, group_size)
        return cls.from_table(table)

    @classmethod
    def from_table(cls, table: QuantizedLinear) -> "QuantizedEmbedding":
        """An embedding reading ``table``'s tensors (the same tensor objects: a tied head and its embedding)."""
        return cls(table.out_features, table.in_features, table.scheme, table.tensors(), table.group_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def as_table(self, activations: str | None = None) -> QuantizedLinear:
        """A QuantizedLinear (dim -> vocab, no bias) over this embedding's tensors: the tied LM head."""
        return QuantizedLinear(self.embedding_dim, self.num_embeddings, self.scheme, self.tensors(), None,
                               self.group_size, activations)

    def dequantize(self) -> torch.Tensor:
        """The whole fp32 table (num_embeddings, embedding_dim): the reference."""
        table = self.as_table().dequantize()
        return table * self.input_scale if "input_scale" in self._buffers else table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (...) int64 -> (..., embedding_dim) fp32; equal to ``dequantize()[input_ids]``."""
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got {int(input_ids.min())}.."
                             f"{int(input_ids.max())}")
        rows = self._rows(input_ids.reshape(-1))
        if "input_scale" in self._buffers:  # an AWQ-quantized tied head: its columns were scaled by 1 / input_scale
            rows = rows * self.input_scale
        return rows.view(*input_ids.shape, self.embedding_dim)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        t = self.tensors()
        if self.scheme == "int8":
            return formats.dequantize_int8({"qweight": t["qweight"][rows], "scales": t["scales"][rows]}, self.group_size)
        if self.scheme == "int4":
            picked = {name: t[name][rows] for name in ("qweight", "scales", "zeros", "mins") if name in t}
            return formats.dequantize_int4(picked, self.group_size)
        blocks_per_row = self.embedding_dim // formats.NF4_BLOCK
        blocks = (rows[:, None] * blocks_per_row + torch.arange(blocks_per_row)).reshape(-1)
        return formats.dequantize_nf4({"qweight": t["qweight"][rows], "absmax": formats.nf4_absmax(t, blocks)})

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}{group}"


def _as_linear(embedding: nn.Embedding) -> nn.Linear:
    linear = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
    linear.weight = embedding.weight
    return linear
