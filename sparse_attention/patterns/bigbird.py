"""BigBird block-sparse attention, ITC variant (Zaheer et al., 2020, arXiv:2007.14062).

Positions are cut into blocks of ``block`` along the key axis (block c holds positions
[c*block, (c+1)*block); the last block may be shorter). With KB blocks:

* global blocks: the first ceil(g/2) and the last floor(g/2) blocks (g = global_blocks;
  the default g=2 makes the first and the last block global, as in the paper and in
  HF transformers). Queries in them attend everything; every query attends them.
* window: query block m attends key blocks m-r .. m+r, r = (window_blocks - 1) // 2.
* random: each query block attends ``random_blocks`` further blocks drawn from those
  that are neither in its window nor global (seeded by ``seed``).

BigBird(block=1, window_blocks=3, global_blocks=2, random_blocks=0), N=S=6::

    x x x x x x
    x x x . . x
    x x x x . x
    x . x x x x
    x . . x x x
    x x x x x x
"""

from __future__ import annotations

import functools

import torch

from .._checks import check_int, check_seed
from .base import Composite, Pattern, block_position_range, candidates_from_ranges, num_blocks, query_positions
from .global_tokens import Global
from .random_blocks import RandomBlocks


class BlockWindow(Pattern):
    """|i // block - j // block| <= radius: a sliding window at block granularity."""

    def __init__(self, block: int, radius: int):
        self.block = check_int("block", block, minimum=1)
        self.radius = check_int("radius", radius, minimum=0)

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        qb = torch.div(query_positions(q_idx, n_q, n_k), self.block, rounding_mode="floor")
        kb = torch.div(kv_idx, self.block, rounding_mode="floor")
        return (qb - kb).abs() <= self.radius

    def _candidates(self, n_q, n_k, block, device):
        first, last = block_position_range(n_q, n_k, block, device)
        b = self.block
        lo = (torch.div(first, b, rounding_mode="floor") - self.radius) * b
        hi = (torch.div(last, b, rounding_mode="floor") + self.radius + 1) * b - 1
        return candidates_from_ranges(lo, hi, n_k, block)


def _global_block_ids(num_kv_blocks: int, global_blocks: int) -> list[int]:
    head = -(-global_blocks // 2)
    tail = global_blocks // 2
    ids = set(range(min(head, num_kv_blocks)))
    ids |= set(range(max(num_kv_blocks - tail, 0), num_kv_blocks))
    return sorted(ids)


class _BigBirdAvoid:
    """Block pairs the random draw must skip: the window and the global blocks (hashable)."""

    def __init__(self, radius: int, global_blocks: int):
        self.radius, self.global_blocks = radius, global_blocks

    def __call__(self, m, n, kb):
        g = torch.tensor(_global_block_ids(kb, self.global_blocks), dtype=torch.long)
        return ((m - n).abs() <= self.radius) | torch.isin(n, g) | torch.isin(m, g)

    def __eq__(self, other):
        return isinstance(other, _BigBirdAvoid) and (self.radius, self.global_blocks) == (
            other.radius, other.global_blocks)

    def __hash__(self):
        return hash((self.radius, self.global_blocks))


class BigBird(Composite):
    """Block window + global blocks + random blocks (see the module docstring for which blocks)."""

    def __init__(self, block: int = 64, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
                 seed: int = 0):
        self.block = check_int("block", block, minimum=1)
        self.window_blocks = check_int("window_blocks", window_blocks, minimum=1)
        if self.window_blocks % 2 == 0:
            raise ValueError(f"window_blocks must be odd (the window is centred), got {window_blocks}")
        self.global_blocks = check_int("global_blocks", global_blocks, minimum=0)
        self.random_blocks = check_int("random_blocks", random_blocks, minimum=0)
        self.seed = check_seed(seed)

    def compose(self, n_q, n_k):
        return _bigbird(self.block, self.window_blocks, self.global_blocks, self.random_blocks, self.seed, n_k)

    def global_positions(self, n_k: int) -> list[int]:
        """Key-space positions of the global blocks for S = n_k."""
        ids = _global_block_ids(num_blocks(n_k, self.block), self.global_blocks)
        return [p for c in ids for p in range(c * self.block, min((c + 1) * self.block, n_k))]


@functools.lru_cache(maxsize=32)
def _bigbird(block, window_blocks, global_blocks, random_blocks, seed, n_k) -> Pattern:
    radius = (window_blocks - 1) // 2
    parts: list[Pattern] = [BlockWindow(block, radius)]
    bb = BigBird(block, window_blocks, global_blocks, random_blocks, seed)
    if global_blocks:
        parts.append(Global(bb.global_positions(n_k)))
    if random_blocks:
        parts.append(RandomBlocks(random_blocks, block, seed, avoid=_BigBirdAvoid(radius, global_blocks)))
    out = parts[0]
    for p in parts[1:]:
        out = out | p
    return out
