"""Attention masks with one q_start per row (rows of a serving batch at different lengths) equal each row
attended on its own, in every backend."""

import pytest
import torch

from lmstack.nn.attention import attend
from lmstack.nn.masks import AttentionMask


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("alibi", [False, True])
def test_per_row_starts_equal_rows_alone(backend, window, alibi):
    torch.manual_seed(0)
    B, H, Hkv, T, K, D = 3, 4, 2, 2, 9, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
    starts = torch.tensor([0, 4, 7])
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if alibi else None
    together = attend(q, k, v, AttentionMask(q_start=starts, sliding_window=window, alibi_slopes=slopes),
                      backend=backend)
    for b, start in enumerate(starts.tolist()):
        n = start + T  # the row's own keys; later slots are hidden by causality
        alone = attend(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                       AttentionMask(q_start=start, sliding_window=window, alibi_slopes=slopes), backend=backend)
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-6, rtol=1e-5)


def test_per_row_starts_are_never_the_plain_causal_fast_path():
    mask = AttentionMask(q_start=torch.tensor([0, 0]))
    assert not mask.is_plain_causal(4, 4)
    assert mask.q_start_range() == (0, 0)
    q_slots, k_slots = mask.slots(2, 3, torch.device("cpu"))
    assert q_slots.shape == (2, 2) and k_slots.shape == (3,)
