"""A paged KV cache: fixed-size blocks in one pool, a block table per sequence, prefix sharing.

vLLM's design (Kwon et al. 2023, https://arxiv.org/abs/2309.06180) on plain tensors:

    pool        k, v: (layers, num_blocks, block_size, Hkv, D)   allocated once
    sequence    block table [7, 2, 9]: its slot s lives in block table[s // block_size], offset s % block_size
    allocator   a free queue (least recently used first), reference counts, and a map from the digest of a
                full block's tokens (chained with its parent's) to the block that holds their keys/values,
                so a new request whose prompt starts with the same tokens reuses those blocks

``PackedBatch`` is one step's view of the pool: the new tokens of several sequences packed in one row
(a prefill chunk of a long prompt beside one token of each decoding sequence). It implements the model's
``PackedKVCache`` protocol (``lmstack.nn.kv_cache``): it writes each token's keys/values into its slot and
attends within each sequence over its (non-contiguous) blocks, gathered by its block table.
"""

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.kernels.paged_attention import paged_decode_attention
from lmstack.nn.attention import attend


class OutOfBlocks(LmstackError):
    """The pool has no free block left (the scheduler preempts a sequence and retries)."""


def block_digest(parent: bytes | None, tokens: list[int]) -> bytes:
    """The identity of a full block: its tokens and, through ``parent``, every token before them."""
    h = hashlib.sha256(parent or b"root")
    h.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
    return h.digest()


class BlockAllocator:
    """Hands out block ids, counts their users, and keeps freed full blocks findable by digest.

    A block is *free* when nobody uses it; free blocks wait in a queue, least recently used first, and
    an allocation takes the head (evicting its digest: its contents are about to be overwritten).
    Freed blocks that hold a digest go to the tail (kept longest), others to the head (reused first).

    Args:
        num_blocks: blocks in the pool.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.digest_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hits = self.queries = 0  # prefix-cache statistics, in blocks

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> int:
        """A fresh block with one user; raises OutOfBlocks when none is free."""
        if not self.free_queue:
            raise OutOfBlocks("no free KV block")
        block, _ = self.free_queue.popitem(last=False)
        digest = self.digest_of[block]
        if digest is not None:  # evicted from the prefix cache
            del self.block_of[digest]
            self.digest_of[block] = None
        self.refs[block] = 1
        return block

    def lookup(self, digests: list[bytes]) -> list[int]:
        """The blocks holding the longest cached run of ``digests`` (a prompt's full blocks, in order),
        each now with one more user."""
        found = []
        for digest in digests:
            block = self.block_of.get(digest)
            if block is None:
                break
            found.append(block)
        self.queries += len(digests)
        self.hits += len(found)
        for block in found:
            self.free_queue.pop(block, None)
            self.refs[block] += 1
        return found

    def register(self, block: int, digest: bytes) -> None:
        """Record that ``block`` (full, in use) holds the tokens ``digest`` names. If another block already
        does (two requests computed the same prompt at once), this one stays unnamed."""
        if self.digest_of[block] is None and digest not in self.block_of:
            self.digest_of[block] = digest
            self.block_of[digest] = block

    def free(self, blocks: list[int]) -> None:
        """One user fewer for each block; a block nobody uses joins the free queue."""
        for block in reversed(blocks):  # a sequence's last blocks are the least likely to be shared
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} freed twice"
            if self.refs[block] == 0:
                self.free_queue[block] = None
                if self.digest_of[block] is None:
                    self.free_queue.move_to_end(block, last=False)


class PagedKVPool:
    """The block storage of every layer: k, v each (layers, num_blocks, block_size, Hkv, D).

    Args:
        n_layers, num_blocks, block_size, n_kv_heads, head_dim: the shape; dtype, device: the buffers'.
    """

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        shape = (n_layers, num_blocks * block_size, n_kv_heads, head_dim)  # blocks flattened into slots
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @classmethod
    def for_model(cls, model: nn.Module, num_blocks: int, block_size: int) -> "PagedKVPool":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim, p.dtype, p.device)

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass(frozen=True)
class _Group:
    """Rows attended in one call: G rows of up to c new tokens each, padded."""

    query_index: torch.Tensor  # (G * c,) where each padded query sits in the packed row (pads repeat a real one)
    valid: torch.Tensor  # (G * c,) bool: a real query
    key_slots: torch.Tensor  # (G, Kmax) pool slots of each row's keys 0..Kmax-1 (past its length: slot 0)
    starts: torch.Tensor  # (G,) each row's first new position
    width: int  # c


class PackedBatch:
    """One forward step over sequences packed in one row: the ``PackedKVCache`` the model attends through.

    Args:
        pool: the block storage.
        rows: per sequence, (block_table, start, n_new): its first new token sits at position ``start`` and
            the block table covers positions up to ``start + n_new - 1``. Their tokens follow each other in
            the packed row in this order.
        use_kernel: decoding rows attend through the C++ kernel that reads the pool in place (where it
            applies); False keeps the eager gather-then-attend path, the reference.
    """

    length = 0  # no shared length: positions come from position_ids

    def __init__(self, pool: PagedKVPool, rows: list[tuple[list[int], int, int]], use_kernel: bool = True) -> None:
        self.pool, self.use_kernel = pool, use_kernel
        bs, device = pool.block_size, pool.k.device
        for table, start, n_new in rows:
            if start + n_new > len(table) * bs:
                raise ValueError(f"a block table of {len(table)} blocks cannot hold {start + n_new} positions")
        rows = [(torch.tensor(table), start, n_new) for table, start, n_new in rows]
        write, offsets, offset = [], [], 0
        for table, start, n_new in rows:
            write.append(self._pool_slots(table, torch.arange(start, start + n_new)))
            offsets.append(offset)
            offset += n_new
        self.n_tokens = offset
        self.write_slots = torch.cat(write).to(device) if write else torch.zeros(0, dtype=torch.long, device=device)
        # Decoding rows (one new token) attend in one call; rows with several (prefill chunks) in another.
        decode = [i for i, r in enumerate(rows) if r[2] == 1]
        prefill = [i for i, r in enumerate(rows) if r[2] > 1]
        self.groups = [self._group([rows[i] for i in idx], [offsets[i] for i in idx], device)
                       for idx in (decode, prefill) if idx]

    def _pool_slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The pool slots of a sequence's ``positions`` through its block table (a long tensor)."""
        bs = self.pool.block_size
        return table[positions // bs] * bs + positions % bs

    def _group(self, rows, offsets, device) -> _Group:
        width = max(n for _, _, n in rows)
        n_keys = max(start + n for _, start, n in rows)
        query_index, valid, key_slots = [], [], []
        for (table, start, n_new), offset in zip(rows, offsets):
            i = torch.arange(width)
            query_index.append(offset + i.clamp(max=n_new - 1))
            valid.append(i < n_new)
            positions = torch.arange(n_keys)
            inside = positions < start + n_new
            key_slots.append(torch.where(inside, self._pool_slots(table, positions.clamp(max=start + n_new - 1)), 0))
        starts = torch.tensor([start for _, start, _ in rows])
        return _Group(torch.cat(query_index).to(device), torch.cat(valid).to(device),
                      torch.stack(key_slots).to(device), starts.to(device), width)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask,
               scale: float | None, backend: str) -> torch.Tensor:
        """q: (1, H, N, D); k, v: (1, Hkv, N, D) -> (1, H, N, D). See ``PackedKVCache``."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]  # (slots, Hkv, D)
        pool_k.index_copy_(0, self.write_slots, k[0].transpose(0, 1).to(pool_k.dtype))
        pool_v.index_copy_(0, self.write_slots, v[0].transpose(0, 1).to(pool_v.dtype))
        H, D = q.shape[1], q.shape[3]
        out = torch.empty_like(q[0])  # (H, N, D)
        for g in self.groups:
            G = g.starts.shape[0]
            if g.width == 1 and self.use_kernel and mask.alibi_slopes is None:
                y = paged_decode_attention(q[0][:, g.query_index].transpose(0, 1), pool_k, pool_v, g.key_slots,
                                           g.starts + 1, mask.sliding_window, scale or D ** -0.5)
                if y is not None:  # (G, H, D): read in place from the pool
                    out[:, g.query_index] = y.transpose(0, 1)
                    continue
            qg = q[0][:, g.query_index].view(H, G, g.width, D).transpose(0, 1)  # (G, H, c, D)
            kg = pool_k[g.key_slots].transpose(1, 2).to(q.dtype)  # (G, Hkv, Kmax, D)
            vg = pool_v[g.key_slots].transpose(1, 2).to(q.dtype)
            # Causal from each row's own start; the slots past a row's length are hidden by causality.
            row_mask = replace(mask, causal=True, q_start=g.starts, key_padding=None, segments=None)
            y = attend(qg, kg, vg, row_mask, scale=scale, backend=backend)  # (G, H, c, D)
            y = y.transpose(0, 1).reshape(H, G * g.width, D)
            out[:, g.query_index[g.valid]] = y[:, g.valid]
        return out[None]

    def advance(self, n_tokens: int) -> None:
        """The scheduler advances each sequence itself."""
