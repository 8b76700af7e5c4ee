"""Rank-aware batches: each data-parallel rank trains on its contiguous slice of every global batch.

Every rank runs the same batch source (same seed, same order), so the global sequence of batches is the
single-process one whatever the world size, and the source's position (its ``state_dict``) is the same on
every rank: a checkpoint saved on 4 ranks resumes on 2, or on one, at the same place in the data.
"""

import torch

from lmstack.errors import ConfigError


class RankSlice:
    """Rows ``[rank * n / size, (rank + 1) * n / size)`` of each batch of ``source`` (tensors, tuples or dicts of
    tensors with the batch first); ``state_dict`` / ``load_state_dict`` are the source's."""

    def __init__(self, source, rank: int, size: int) -> None:
        self.source, self.rank, self.size = source, rank, size

    def next_batch(self):
        return self._slice(self.source.next_batch())

    def _slice(self, batch):
        if isinstance(batch, dict):
            return {k: self._slice(v) if isinstance(v, (torch.Tensor, tuple, list, dict)) else v
                    for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._slice(b) for b in batch)
        rows = batch.shape[0]
        if rows % self.size:
            raise ConfigError(f"a batch of {rows} rows does not split over {self.size} data-parallel ranks; make "
                              f"train.batch_size a multiple of {self.size}")
        share = rows // self.size
        return batch[self.rank * share:(self.rank + 1) * share]

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def __getattr__(self, name):  # the source's other attributes (blocks_per_epoch, data, ...)
        return getattr(self.source, name)
