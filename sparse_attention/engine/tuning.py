"""Block size choice for the block-sparse engine.

Smaller blocks waste fewer pairs at a pattern's edges; larger blocks run the fused
kernel closer to its peak (its query tile grows with the block) and need fewer calls.
``choose_block`` classifies a sample of query-block rows for each candidate size and
picks the cheapest under a cost model of the CPU kernel measured on this project's
2-core AVX-512 machine (torch 2.13, benchmarks/RESULTS.md): relative kernel rate by
query-tile height, the price of an element mask, and a fixed price per kernel call.
"""

from __future__ import annotations

import functools

import torch

from ..patterns.base import FULL, Pattern, classify_candidates

CANDIDATES = (32, 64, 128, 256)

_MASK_COST = 1.08  # an additive mask slows the kernel by 0-10% (benchmarks/kernel_probe.py)
_CALL_COST_PAIRS = 16384  # fixed work per call in pairs per head (an estimate of ~0.2 ms, not measured)
_SAMPLE_ROWS = 24  # query-block rows classified to estimate a layout's cost


def _kernel_rate(rows: int) -> float:
    """Relative kernel speed for items of ``rows`` query rows (measured: 64 -> 0.70 ... 512 -> 0.91 of dense)."""
    if rows >= 512:
        return 0.91
    if rows >= 256:
        return 0.88
    if rows >= 128:
        return 0.76
    if rows >= 64:
        return 0.70
    return 0.5


def layout_cost(pattern: Pattern, n_q: int, n_k: int, block: int, group: int = 1) -> float:
    """Estimated time of one head's forward at this block size, in pairs at the dense rate.

    Classifies a sample of query-block rows (evenly spaced, first and last included)
    and extrapolates, so trying a block size costs far less than building its layout.
    """
    cand = pattern._candidates(n_q, n_k, block, torch.device("cpu"))
    QB = cand.shape[1]
    if QB == 0:
        return 0.0
    rows = torch.unique(torch.linspace(0, QB - 1, min(QB, _SAMPLE_ROWS)).round().long())
    kind = classify_candidates(pattern, cand, n_q, n_k, block, rows)  # (Hl, r, K)
    visited = (kind != 0).sum(-1)  # (Hl, r) key blocks per item
    masked = ((kind != 0) & (kind != FULL)).any(-1)
    work = (visited * block * block).double() * torch.where(masked, _MASK_COST, 1.0)
    groups = len({(int(c), bool(m)) for c, m in zip(visited.flatten(), masked.flatten(), strict=True)})
    per_head = float(work.sum()) * QB / rows.numel() / kind.shape[0]
    return per_head / _kernel_rate(block * group) + groups * _CALL_COST_PAIRS


@functools.lru_cache(maxsize=256)
def choose_block(pattern: Pattern, n_q: int, n_k: int, group: int = 1) -> int:
    """Block size for this pattern and these lengths (``group``: query heads per key/value head)."""
    n = max(n_q, n_k)
    if n <= CANDIDATES[0]:
        return max(n, 1)  # one block covers everything
    options = [b for b in CANDIDATES if b <= n]
    return min(options, key=lambda b: layout_cost(pattern, n_q, n_k, b, group))
