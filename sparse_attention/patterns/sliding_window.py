"""Sliding-window (local) attention.

Each query attends the keys within ``window`` positions of it: |i - j| <= W, or
0 <= i - j <= W when causal. Used by Longformer (Beltagy et al., 2020,
arXiv:2004.05150), Mistral and most long-context models.

W=1, N=S=5 (non-causal left, causal right)::

    x x . . .      x . . . .
    x x x . .      x x . . .
    . x x x .      . x x . .
    . . x x x      . . x x .
    . . . x x      . . . x x
"""

from __future__ import annotations

from .._checks import check_bool, check_int
from .base import Pattern, block_position_range, candidates_from_ranges, query_positions


class SlidingWindow(Pattern):
    """|i - j| <= window (causal: 0 <= i - j <= window), i the query's key-space position."""

    def __init__(self, window: int, causal: bool = False):
        self.window = check_int("window", window, minimum=0)
        check_bool("causal", causal)
        self.causal = causal

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        d = query_positions(q_idx, n_q, n_k) - kv_idx
        ok = d <= self.window
        return ok & (d >= 0) if self.causal else ok & (d >= -self.window)

    def _candidates(self, n_q, n_k, block, device):
        first, last = block_position_range(n_q, n_k, block, device)
        hi = last if self.causal else last + self.window
        return candidates_from_ranges(first - self.window, hi, n_k, block)
