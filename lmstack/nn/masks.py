"""Attention masks described by structure (causal, sliding window, key padding, ALiBi), not by a T x T tensor.

Query i of a call sits at cache slot ``q_start + i`` (``q_start`` one int for every row, or one per row
when rows of a batch sit at different lengths: a serving batch); key j sits at slot j. A key is visible when
    causal:   j <= q_start + i
    window:   (q_start + i) - j < sliding_window   (the window counts the query's own token)
    padding:  key_padding[b, j] is True
    segments: segments[b, q_start + i] == segments[b, j]   (packed sequences attend only within their own)
Describing the mask this way lets the tiled flash kernel build each tile's mask on the fly, so no
backend is forced to materialise the full (T, T) matrix. Shapes: B batch, H heads, Tq queries, Tk keys.
"""

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend to.

    Attributes:
        causal: queries see only keys at or before their own slot.
        sliding_window: if set, queries see only the last ``sliding_window`` slots (their own included).
        key_padding: (B, Tk) bool, True where the key is a real token, False where it is padding.
        q_start: cache slot of the first query (the number of tokens already in the KV cache): an int, or a
            (B,) long tensor when each row has its own (rows of different lengths decoding together).
        alibi_slopes: (H,) float; adds ``-slope * (q_slot - k_slot)`` to the scores when set.
        position_bias: (1 or B, H, Tq, Tk) float added to the scores of this call's queries (T5's
            relative bias); row i belongs to query slot ``q_start + i``, column j to key slot j.
        segments: (B, Tk) int, the segment of each slot when several sequences are packed into one row
            (SFT packing); a query sees only keys of its own segment. Padding is ``key_padding``'s job.
    """

    causal: bool = True
    sliding_window: int | None = None
    key_padding: torch.Tensor | None = None
    q_start: int | torch.Tensor = 0
    alibi_slopes: torch.Tensor | None = None
    position_bias: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def with_window(self, sliding_window: int | None) -> "AttentionMask":
        """The same mask with a (layer-specific) sliding window."""
        return self if sliding_window == self.sliding_window else replace(self, sliding_window=sliding_window)

    def visible(self, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor | None:
        """Boolean visibility (B or 1, 1, Tq, Tk) for the given slots, or None when every key is visible.

        q_slots: (Tq,), or (B, Tq) with a per-row ``q_start``; k_slots: (Tk,)."""
        q, k = q_slots[..., :, None], k_slots[None, :]  # (Tq, 1) or (B, Tq, 1); (1, Tk)
        allowed = None
        if self.causal:
            allowed = k <= q
        if self.sliding_window is not None:
            in_window = (q - k) < self.sliding_window
            allowed = in_window if allowed is None else allowed & in_window
        if allowed is not None:
            allowed = allowed[None, None] if allowed.dim() == 2 else allowed[:, None]  # (B|1, 1, Tq, Tk)
        if self.key_padding is not None:
            pad = self.key_padding[:, k_slots].bool()[:, None, None, :]  # (B, 1, 1, Tk)
            allowed = pad if allowed is None else allowed & pad
        if self.segments is not None:
            seg_q = self.segments[:, q_slots] if q_slots.dim() == 1 else self.segments.gather(1, q_slots)
            same = seg_q[:, None, :, None] == self.segments[:, k_slots][:, None, None, :]
            allowed = same if allowed is None else allowed & same  # (B, 1, Tq, Tk)
        return allowed

    def bias(self, q_slots: torch.Tensor, k_slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive score bias (B or 1, H or 1, Tq, Tk): -inf where hidden, ALiBi where set; None if zero."""
        allowed = self.visible(q_slots, k_slots)
        bias = None
        if self.alibi_slopes is not None:
            distance = (q_slots[..., :, None] - k_slots[None, :]).to(dtype)  # (Tq, Tk) or (B, Tq, Tk)
            distance = distance[None, None] if distance.dim() == 2 else distance[:, None]  # (B|1, 1, Tq, Tk)
            bias = -self.alibi_slopes.to(dtype)[None, :, None, None] * distance  # (B|1, H, Tq, Tk)
        if self.position_bias is not None:
            if self.per_row:
                raise ValueError("a relative position bias needs one q_start for every row")
            rows = self.position_bias.to(dtype)[:, :, q_slots - self.q_start][:, :, :, k_slots]
            bias = rows if bias is None else bias + rows
        if allowed is None:
            return bias
        hidden = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
        return hidden if bias is None else bias + hidden

    @property
    def per_row(self) -> bool:
        """True when each row has its own ``q_start`` (a (B,) tensor)."""
        return isinstance(self.q_start, torch.Tensor)

    def q_start_range(self) -> tuple[int, int]:
        """The smallest and largest ``q_start`` over the rows (both the same int without per-row starts)."""
        if self.per_row:
            return int(self.q_start.min()), int(self.q_start.max())
        return self.q_start, self.q_start

    def slots(self, n_queries: int, n_keys: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache slots of this call's queries, (Tq,) or (B, Tq) with per-row starts, and of all keys (Tk,)."""
        offsets = torch.arange(n_queries, device=device)
        q_slots = self.q_start.to(device)[:, None] + offsets if self.per_row else offsets + self.q_start
        return q_slots, torch.arange(n_keys, device=device)

    def is_plain_causal(self, n_queries: int, n_keys: int) -> bool:
        """True when the mask is exactly lower-triangular from slot 0 (SDPA's ``is_causal`` fast path)."""
        no_extras = (self.sliding_window is None and self.key_padding is None and self.alibi_slopes is None
                     and self.position_bias is None and self.segments is None)
        return self.causal and no_extras and not self.per_row and self.q_start == 0 and n_queries == n_keys

    def sees_everything(self, n_queries: int, n_keys: int) -> bool:
        """True when every query sees every key (e.g. one decode step with no padding or window)."""
        if (self.key_padding is not None or self.alibi_slopes is not None or self.position_bias is not None
                or self.segments is not None):
            return False
        first_start, last_start = self.q_start_range()
        last_query_slot = last_start + n_queries - 1
        if self.sliding_window is not None and last_query_slot >= self.sliding_window:
            return False  # the last query no longer sees key 0
        # Causal: the first query of every row must already see the last key.
        return not self.causal or first_start >= n_keys - 1


def packed_segments(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The segment ids of an attention mask that packs several sequences per row, or None.

    ``attention_mask`` (B, Tk): 0 for padding, 1 for real tokens; a packed row numbers its sequences
    1, 2, 3, ... instead (the segment-id convention of packed SFT), and each attends only within itself.
    A plain 0/1 mask is one segment per row, so it returns None and keeps every fast path."""
    if attention_mask is None or attention_mask.dtype == torch.bool or attention_mask.numel() == 0:
        return None
    return attention_mask if bool(attention_mask.max() > 1) else None
