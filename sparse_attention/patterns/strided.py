"""Strided (dilated) attention: keys at a multiple of ``stride`` positions away.

The "strided" head of the Sparse Transformer (Child et al., 2019, arXiv:1904.10509):
(i - j) mod stride == 0, with causal adding i >= j.

stride=2, N=S=5, causal::

    x . . . .
    . x . . .
    x . x . .
    . x . x .
    x . x . x
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_int
from .base import Pattern, all_candidates, block_position_range, candidates_from_ranges, query_positions


class Strided(Pattern):
    """(i - j) mod stride == 0 (causal: and j <= i)."""

    def __init__(self, stride: int, causal: bool = False):
        self.stride = check_int("stride", stride, minimum=1)
        check_bool("causal", causal)
        self.causal = causal

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        d = query_positions(q_idx, n_q, n_k) - kv_idx
        ok = torch.remainder(d, self.stride) == 0
        return ok & (d >= 0) if self.causal else ok

    def _candidates(self, n_q, n_k, block, device):
        # A block of `block` consecutive keys holds every residue once stride <= block, so
        # (almost) every block is visited; empty ones are dropped when the layout is built.
        if not self.causal:
            return all_candidates(n_q, n_k, block, device)
        _, last = block_position_range(n_q, n_k, block, device)
        return candidates_from_ranges(torch.zeros_like(last), last, n_k, block)
