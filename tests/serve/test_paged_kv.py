"""The paged KV cache: the allocator's reference counts, prefix lookups and LRU eviction, and a packed
batch of sequences at different lengths computing what each sequence computes alone on a static cache."""

import pytest
import torch

from lmstack.models import DecoderConfig, build_model
from lmstack.nn.kv_cache import StaticKVCache
from lmstack.serve.paged_kv import BlockAllocator, OutOfBlocks, PackedBatch, PagedKVPool, block_digest


def test_allocator_counts_users_and_runs_out():
    alloc = BlockAllocator(3)
    blocks = [alloc.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate()
    alloc.free([blocks[0]])
    assert alloc.num_free == 1 and alloc.allocate() == blocks[0]


def test_prefix_blocks_are_shared_then_evicted_least_recently_used_first():
    alloc = BlockAllocator(4)
    a = block_digest(None, [1, 2])
    b = block_digest(a, [3, 4])
    first, second = alloc.allocate(), alloc.allocate()
    alloc.register(first, a)
    alloc.register(second, b)
    assert alloc.lookup([a, b, block_digest(b, [5, 6])]) == [first, second]  # the third is not cached
    assert alloc.refs[first] == 2
    alloc.free([first, second])
    alloc.free([first, second])  # both users gone: the blocks stay findable in the free queue
    assert alloc.num_free == 4 and alloc.lookup([a]) == [first]
    alloc.free([first])
    # Unnamed blocks are handed out before named ones; then the least recently freed named one goes first.
    fresh = [alloc.allocate(), alloc.allocate()]
    assert first not in fresh and second not in fresh
    assert alloc.allocate() == second  # freed before `first` was freed again
    assert alloc.lookup([a, b]) == [first]  # b was evicted with its block; a survives
    assert block_digest(None, [1, 2]) == a and block_digest(None, [2, 1]) != a


def test_a_second_block_with_the_same_tokens_stays_unnamed():
    alloc = BlockAllocator(2)
    d = block_digest(None, [7])
    x, y = alloc.allocate(), alloc.allocate()
    alloc.register(x, d)
    alloc.register(y, d)
    assert alloc.block_of[d] == x and alloc.digest_of[y] is None


@pytest.fixture(scope="module")
def model():
    config = DecoderConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                           sliding_window=6)
    return build_model(config, seed=0).eval()


def _alone(model, ids, start):
    """Hidden states of ids[start:] after ids[:start] on a static cache: the reference."""
    cache = StaticKVCache.for_model(model, 1, len(ids))
    with torch.inference_mode():
        if start:
            model.hidden_states(torch.tensor([ids[:start]]), kv_cache=cache)
        return model.hidden_states(torch.tensor([ids[start:]]), kv_cache=cache)[0]


@pytest.mark.parametrize("use_kernel", [False, True])
def test_packed_sequences_equal_each_sequence_alone(model, use_kernel):
    torch.manual_seed(0)
    block = 4
    pool = PagedKVPool.for_model(model, num_blocks=16, block_size=block)
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (9, 3, 14)]
    tables = [[5, 1, 9], [0], [2, 3, 11, 7]]  # scattered blocks: attention reads non-contiguous memory
    # First step: prefill all but the last 1, 2, 5 tokens; second step: the rest (a decode and two chunks).
    split = [len(s) - n for s, n in zip(seqs, (1, 2, 5))]
    with torch.inference_mode():
        for step in range(2):
            rows, ids, pos = [], [], []
            for s, table, cut in zip(seqs, tables, split):
                lo, hi = (0, cut) if step == 0 else (cut, len(s))
                rows.append((table, lo, hi - lo))
                ids += s[lo:hi]
                pos += range(lo, hi)
            batch = PackedBatch(pool, rows, use_kernel=use_kernel)
            hidden = model.hidden_states(torch.tensor([ids]), position_ids=torch.tensor([pos]), kv_cache=batch)[0]
        offset = 0
        for s, cut in zip(seqs, split):
            n = len(s) - cut
            torch.testing.assert_close(hidden[offset:offset + n], _alone(model, s, cut), atol=1e-5, rtol=1e-5)
            offset += n


def test_decode_kernel_equals_the_eager_path(model):
    torch.manual_seed(1)
    pool = PagedKVPool.for_model(model, num_blocks=8, block_size=4)
    pool.k.normal_(), pool.v.normal_()
    rows = [([3, 6, 1], 9, 1), ([0, 2], 4, 1), ([5], 0, 1)]
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    from lmstack.nn.masks import AttentionMask

    with torch.inference_mode():
        outs = [PackedBatch(pool, rows, use_kernel=flag).attend(0, q, k, v, AttentionMask(sliding_window=window),
                                                                None, "sdpa")
                for flag in (False, True) for window in (None, 3)]
    torch.testing.assert_close(outs[0], outs[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[1], outs[3], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(outs[0], outs[1])  # the window changes the answer


def test_packed_rows_are_refused_with_a_mask_or_without_positions(model):
    pool = PagedKVPool.for_model(model, num_blocks=2, block_size=4)
    batch = PackedBatch(pool, [([0], 0, 2)])
    with pytest.raises(ValueError, match="position_ids"):
        model.hidden_states(torch.tensor([[1, 2]]), kv_cache=batch)
    with pytest.raises(ValueError, match="cannot hold"):
        PackedBatch(pool, [([0], 3, 2)])
    with pytest.raises(ValueError, match="context"):
        model.hidden_states(torch.tensor([[1, 2]]), position_ids=torch.tensor([[63, 64]]), kv_cache=batch)
