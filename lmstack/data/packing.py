"""Fixed-length training blocks from token shards, in a seeded order whose position can be saved.

Training (``PackedBlocks``): each epoch cuts every shard into non-overlapping windows of block_size + 1
tokens, starting at an epoch-dependent offset (so block boundaries move between epochs), and visits the
windows in a seeded permutation. The order is a pure function of (seed, epoch), so the sampler's whole
state is (epoch, cursor): saving and restoring it resumes the exact batch sequence.
Evaluation (``eval_batches``): the first windows of the held-out split, in order, the same every time.

A window w gives inputs w[:-1] and next-token targets w[1:] (teacher forcing), each (B, block_size).
"""

from typing import Iterator

import numpy as np
import torch

from lmstack.data.shards import TokenShards
from lmstack.errors import DataError


class PackedBlocks:
    """Endless batches of (inputs, targets), each (batch_size, block_size) int64, from a training split."""

    def __init__(self, data: TokenShards, block_size: int, batch_size: int, seed: int) -> None:
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        if all(len(s) < block_size + 1 for s in data.shards):
            raise DataError(f"the {data.split} split holds {data.n_tokens} tokens: too few for one block of "
                            f"{block_size} + 1; use more text or a smaller data.block_size")
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, None

    def _windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, start) of every window of ``epoch``, in visiting order."""
        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            span = self.block_size + 1
            offset = int(torch.randint(0, self.block_size, (1,), generator=g)) if epoch else 0
            shard_ids, starts = [], []
            for i, shard in enumerate(self.data.shards):
                first = offset if len(shard) - offset >= span else 0
                n = (len(shard) - first) // span
                shard_ids.append(np.full(n, i))
                starts.append(first + span * np.arange(n))
            shard_ids, starts = np.concatenate(shard_ids), np.concatenate(starts)
            perm = torch.randperm(len(starts), generator=g).numpy()
            self._order_epoch, self._order = epoch, (shard_ids[perm], starts[perm])
        return self._order

    @property
    def blocks_per_epoch(self) -> int:
        return len(self._windows(self.epoch)[1])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets); crosses into the next epoch as needed."""
        rows = []
        while len(rows) < self.batch_size:
            shard_ids, starts = self._windows(self.epoch)
            if self.cursor >= len(starts):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            shard, start = self.data.shards[shard_ids[self.cursor]], starts[self.cursor]
            rows.append(np.asarray(shard[start:start + self.block_size + 1], dtype=np.int64))
            self.cursor += 1
        return _split(rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "block_size": self.block_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the seed and shapes must be the ones it was saved with."""
        for key in ("seed", "block_size", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"cannot resume the data order: saved {key}={state.get(key)}, now {getattr(self, key)}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_batches(data: TokenShards, block_size: int, batch_size: int,
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows of a (held-out) split as (inputs, targets) batches; the last
    batch may be smaller. Deterministic, so evaluations at different steps see the same text."""
    rows, produced = [], 0
    for shard in data.shards:
        for start in range(0, len(shard) - block_size, block_size + 1):
            rows.append(np.asarray(shard[start:start + block_size + 1], dtype=np.int64))
            if len(rows) == batch_size:
                yield _split(rows)
                rows, produced = [], produced + 1
                if max_batches is not None and produced >= max_batches:
                    return
    if rows:
        yield _split(rows)


def _split(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.from_numpy(np.stack(rows))
    return windows[:, :-1], windows[:, 1:]
