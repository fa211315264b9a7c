"""Block size choice for the block-sparse engine.

Smaller blocks waste fewer pairs at a pattern's edges; larger blocks run the fused
kernel closer to its peak and need fewer calls. ``choose_block`` builds the layout for
each candidate size (cached, O(kept pairs) each) and picks the cheapest under a simple
cost model of the CPU kernel, measured on this project's 2-core AVX-512 machine
(benchmarks/RESULTS.md): relative kernel rate by query-tile height, the cost of a
causal triangle and of an element-masked block relative to a full one, and a per-row
price for merging one more partial result.
"""

from __future__ import annotations

import functools

import torch

from ..patterns.base import ANTICAUSAL, CAUSAL, FULL, MASKED, Pattern, classify_candidates

CANDIDATES = (32, 64, 128, 256)

# time per computed pair relative to a full block of a tall tile
_KIND_COST = {FULL: 1.0, CAUSAL: 0.7, ANTICAUSAL: 0.8, MASKED: 2.5}
# merging one more partial result into a row costs about this many pairs' work
_MERGE_COST_PAIRS = 48


def _kernel_rate(rows: int) -> float:
    """Relative kernel speed for query tiles of ``rows`` rows (the CPU kernel's tile is 32/64/256)."""
    if rows >= 192:
        return 1.0
    if rows >= 128:
        return 0.85
    if rows >= 64:
        return 0.65
    return 0.45


# rows of query blocks classified to estimate a layout's cost
_SAMPLE_ROWS = 24


def layout_cost(pattern: Pattern, n_q: int, n_k: int, block: int, group: int = 1) -> float:
    """Estimated time of one head's forward at this block size, in full-block pair units.

    Classifies a sample of query-block rows (evenly spaced, first and last included)
    and extrapolates, so trying a block size costs far less than building its layout.
    """
    cand = pattern._candidates(n_q, n_k, block, torch.device("cpu"))
    QB = cand.shape[1]
    rows = torch.unique(torch.linspace(0, QB - 1, min(QB, _SAMPLE_ROWS)).round().long())
    kind = classify_candidates(pattern, cand, n_q, n_k, block, rows)
    rate = _kernel_rate(block * group)
    cost = 0.0
    for k, c in _KIND_COST.items():
        sel = kind == k
        n = int(sel.sum())
        if n:
            cost += n * block * block * c / rate
            # each kind present in a row is one more partial result to merge
            cost += int(sel.any(-1).sum()) * block * _MERGE_COST_PAIRS
    return cost * QB / rows.numel() / kind.shape[0]


@functools.lru_cache(maxsize=256)
def choose_block(pattern: Pattern, n_q: int, n_k: int, group: int = 1) -> int:
    """Block size for this pattern and these lengths (``group``: query heads per key/value head)."""
    n = max(n_q, n_k)
    options = [b for b in CANDIDATES if b <= max(n, CANDIDATES[0])]
    # one block covering everything: no merge, no waste beyond the sequence itself
    if n <= CANDIDATES[0]:
        return max(n, 1)
    return min(options, key=lambda b: layout_cost(pattern, n_q, n_k, b, group))
