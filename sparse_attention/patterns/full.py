"""Full attention and plain causal attention (the two endpoints of every sparse pattern)."""

from __future__ import annotations

import torch

from .base import Pattern, all_candidates, block_position_range, candidates_from_ranges, query_positions


class Full(Pattern):
    """Every query attends every key. ``attention(q, k, v, Full())`` equals SDPA."""

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        return torch.ones(torch.broadcast_shapes(q_idx.shape, kv_idx.shape), dtype=torch.bool,
                          device=q_idx.device)

    def _candidates(self, n_q, n_k, block, device):
        return all_candidates(n_q, n_k, block, device)


class Causal(Pattern):
    """Query at position i attends keys j <= i (bottom-right aligned when N != S).

    N=3, S=5::

        key j:  0 1 2 3 4
        q 0:    x x x . .     (position 2)
        q 1:    x x x x .     (position 3)
        q 2:    x x x x x     (position 4)
    """

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        return kv_idx <= query_positions(q_idx, n_q, n_k)

    def _candidates(self, n_q, n_k, block, device):
        _, last = block_position_range(n_q, n_k, block, device)
        return candidates_from_ranges(torch.zeros_like(last), last, n_k, block)
