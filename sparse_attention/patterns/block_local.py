"""Block-local attention: tokens attend within their own fixed block.

i // block == j // block, with i the query's key-space position. The local part of
the Image Transformer and of blockwise models (Qiu et al., 2019, arXiv:1911.02972).

block=2, N=S=5::

    x x . . .
    x x . . .
    . . x x .
    . . x x .
    . . . . x
"""

from __future__ import annotations

import torch

from .._checks import check_int
from .base import Pattern, block_position_range, candidates_from_ranges, query_positions


class BlockLocal(Pattern):
    """i // block == j // block."""

    def __init__(self, block: int):
        self.block = check_int("block", block, minimum=1)

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        qb = torch.div(query_positions(q_idx, n_q, n_k), self.block, rounding_mode="floor")
        return qb == torch.div(kv_idx, self.block, rounding_mode="floor")

    def _candidates(self, n_q, n_k, block, device):
        first, last = block_position_range(n_q, n_k, block, device)
        lo = torch.div(first, self.block, rounding_mode="floor") * self.block
        hi = (torch.div(last, self.block, rounding_mode="floor") + 1) * self.block - 1
        return candidates_from_ranges(lo, hi, n_k, block)
