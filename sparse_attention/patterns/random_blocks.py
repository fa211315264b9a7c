"""Random block attention: each query block attends a few random key blocks.

The random component of BigBird (Zaheer et al., 2020, arXiv:2007.14062). Positions are
cut into blocks of ``block`` along the key axis (block c holds positions
[c*block, (c+1)*block)); a query at key-space position i belongs to block i // block.
Every query block attends ``num_blocks`` distinct key blocks drawn uniformly from a
generator seeded with ``seed`` (all of them when fewer exist). The draw depends only on
(seed, S, block), so a decoding step (N=1) sees the same blocks as the full pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .._checks import check_int, check_seed
from .base import Pattern, block_position_range, candidates_from_block_matrix, num_blocks, query_positions


@functools.lru_cache(maxsize=32)
def random_block_table(
    num_kv_blocks: int, num_blocks_per_row: int, seed: int, avoid: Callable | None = None
) -> torch.Tensor:
    """(KBp, KBp) bool: row m (query block) -> the key blocks it draws. CPU tensor."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_kv_blocks, num_kv_blocks, generator=g)
    if avoid is not None:
        m = torch.arange(num_kv_blocks).view(-1, 1)
        n = torch.arange(num_kv_blocks).view(1, -1)
        scores = torch.where(avoid(m, n, num_kv_blocks), torch.full_like(scores, -1.0), scores)
    r = min(num_blocks_per_row, num_kv_blocks)
    table = torch.zeros(num_kv_blocks, num_kv_blocks, dtype=torch.bool)
    if r:
        top = scores.topk(r, dim=-1)
        table.scatter_(1, top.indices, top.values >= 0)
    return table


class RandomBlocks(Pattern):
    """Each query block attends ``num_blocks`` distinct random key blocks (reproducible from ``seed``)."""

    def __init__(self, num_blocks: int, block: int = 64, seed: int = 0, *, avoid: Callable | None = None):
        self.num_blocks = check_int("num_blocks", num_blocks, minimum=0)
        self.block = check_int("block", block, minimum=1)
        self.seed = check_seed(seed)
        # avoid(m, n, KBp) -> bool: block pairs excluded from the draw (BigBird excludes its
        # window and global blocks so the random blocks add new keys).
        self.avoid = avoid

    def table(self, n_k: int, device=None) -> torch.Tensor:
        return random_block_table(num_blocks(n_k, self.block), self.num_blocks, self.seed, self.avoid).to(device)

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        t = self.table(n_k, q_idx.device)
        last = max(t.shape[0] - 1, 0)
        qb = torch.div(query_positions(q_idx, n_q, n_k), self.block, rounding_mode="floor").clamp(0, last)
        kb = torch.div(kv_idx, self.block, rounding_mode="floor").clamp(0, last)
        if t.numel() == 0:
            return torch.zeros(torch.broadcast_shapes(q_idx.shape, kv_idx.shape), dtype=torch.bool,
                               device=q_idx.device)
        return t[qb, kb]

    def _candidates(self, n_q, n_k, block, device):
        QB, KB = num_blocks(n_q, block), num_blocks(n_k, block)
        t = self.table(n_k, device)  # (KBp, KBp)
        KBp = t.shape[0]
        if KBp == 0 or QB == 0:
            return torch.full((1, QB, 0), KB, dtype=torch.long, device=device)
        # engine query block -> range of pattern query blocks it overlaps
        first, last = block_position_range(n_q, n_k, block, device)
        lo = torch.div(first, self.block, rounding_mode="floor").clamp(0, KBp - 1)
        hi = torch.div(last, self.block, rounding_mode="floor").clamp(0, KBp - 1)
        span = int((hi - lo).max()) + 1
        rows = (lo.view(-1, 1) + torch.arange(span, device=device)).clamp(max=KBp - 1)  # (QB, span)
        rows = torch.where(rows <= hi.view(-1, 1), rows, lo.view(-1, 1))
        pattern_cols = t[rows].any(1)  # (QB, KBp): pattern key blocks any query in the block draws
        # pattern key block c covers engine key blocks [c*pb // block, ((c+1)*pb - 1) // block]
        c = torch.arange(KBp, device=device)
        e_lo = c * self.block // block
        e_hi = torch.clamp((c + 1) * self.block - 1, max=n_k - 1) // block
        cover = torch.zeros(KBp, KB + 1, dtype=torch.int32, device=device)
        cover.scatter_add_(1, e_lo.view(-1, 1), torch.ones(KBp, 1, dtype=torch.int32, device=device))
        cover.scatter_add_(1, (e_hi + 1).view(-1, 1), -torch.ones(KBp, 1, dtype=torch.int32, device=device))
        cover = cover.cumsum(1)[:, :KB] > 0  # (KBp, KB)
        engine = (pattern_cols.float() @ cover.float()) > 0  # (QB, KB)
        return candidates_from_block_matrix(engine)
