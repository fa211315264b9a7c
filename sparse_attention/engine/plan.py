"""From a block layout to a plan of kernel calls.

Each query block is one *item*: its queries against the concatenation of every key
block it visits. Items with the same number of key blocks, and the same need (or not)
of an element mask, form a *segment*, which the engine runs as one batched call of
the fused kernel. A query block belongs to exactly one segment, so the kernel's
softmax already spans all of its keys and no partial results need merging.

Why not split a row by block kind (full blocks without a mask, triangles with
``is_causal``)? Measured on the CPU kernel (torch 2.13, AVX-512): ``is_causal`` saves
nothing on blocks of <= 512 keys, an additive mask costs only 5-10%, while every extra
call and merge costs more than that (benchmarks/RESULTS.md).

When the key blocks of every item form one run whose start advances by a fixed step
(sliding windows, block-local), the engine reads K/V through a strided view instead of
gathering them. The plan depends only on (pattern, layout) and is cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..patterns.base import EMPTY, FULL, BlockLayout, Pattern

# Element masks of a segment are kept in the plan up to this many elements (bool);
# larger ones are evaluated from the predicate chunk by chunk at run time.
MASK_STORE_LIMIT = 1 << 25


@dataclass(frozen=True, eq=False)
class Segment:
    rows: torch.Tensor  # (R,) query block of each item, ascending
    kv: torch.Tensor  # (R, K) key blocks of each item
    row_start: int | None  # rows == row_start + arange(R) when not None
    kv_run: tuple[int, int] | None  # (start, step): kv[r, t] == start + r*step + t when not None
    needs_mask: bool  # some visited pair is not allowed (partial blocks, key tail)
    mask: torch.Tensor | None  # stored mask: (R, b, K*b) or (1, b, K*b) when shared by all items
    row_list: tuple[int, ...]  # rows as Python ints (to cut row ranges cheaply)
    fused: bool  # every item visits the same key blocks: a chunk runs as one tall kernel item
    pattern: Pattern
    head: int | None  # layout head for per-head patterns
    n_q: int
    n_k: int
    block: int

    @property
    def num_items(self) -> int:
        return self.rows.numel()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.shape[1]

    def item_mask(self, lo: int, hi: int) -> torch.Tensor | None:
        """(R or 1, b, K*b) bool mask of items lo..hi-1 (True = attend), None if all allowed."""
        if not self.needs_mask:
            return None
        if self.mask is not None:
            return self.mask if self.mask.shape[0] == 1 else self.mask[lo:hi]
        return _evaluate_mask(self.pattern, self.head, self.rows[lo:hi], self.kv[lo:hi], self.n_q, self.n_k,
                              self.block)


@dataclass(frozen=True, eq=False)
class Plan:
    layout: BlockLayout
    heads: tuple[tuple[Segment, ...], ...]  # per layout head (1 when shared by all heads)

    @property
    def block(self) -> int:
        return self.layout.block


def _evaluate_mask(pattern, head, rows, kv, n_q, n_k, b) -> torch.Tensor:
    R, K = kv.shape
    ar = torch.arange(b, device=kv.device)
    qi = (rows * b).view(R, 1, 1) + ar.view(1, b, 1)  # (R, b, 1)
    ki = (kv.unsqueeze(-1) * b + ar).reshape(R, 1, K * b)  # (R, 1, K*b)
    m = pattern.allowed(qi, ki, n_q=n_q, n_k=n_k, head=head) & (ki < n_k)
    return m.expand(R, b, K * b)


def _arith_start(x: torch.Tensor) -> tuple[int, int] | None:
    """(x[0], step) if x is an arithmetic progression with step >= 0, else None."""
    if x.numel() == 0:
        return None
    if x.numel() == 1:
        return int(x[0]), 0
    step = int(x[1] - x[0])
    if step < 0 or not torch.equal(x, x[0] + step * torch.arange(x.numel(), device=x.device)):
        return None
    return int(x[0]), step


def _segment(rows, kv, needs_mask, pattern, layout, head, fused=False) -> Segment:
    R, K = kv.shape
    row_start = _arith_start(rows)
    row_start = row_start[0] if row_start is not None and (row_start[1] == 1 or R == 1) else None
    kv_run = None
    if torch.equal(kv, kv[:, :1] + torch.arange(K, device=kv.device)):
        kv_run = _arith_start(kv[:, 0])
    mask = None
    b = layout.block
    if needs_mask and R * b * K * b <= MASK_STORE_LIMIT:
        mask = _evaluate_mask(pattern, head, rows, kv, layout.n_q, layout.n_k, b)
        # translation-invariant patterns give every interior item the same mask
        mask = mask[:1].clone() if torch.equal(mask, mask[:1].expand_as(mask)) else mask.contiguous()
    return Segment(rows, kv, row_start, kv_run, needs_mask, mask, tuple(rows.tolist()), fused, pattern, head,
                   layout.n_q, layout.n_k, b)


def _column_blocks(kv_index: torch.Tensor, valid: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Key blocks that every query block with any key visits (global keys, causal's first block)."""
    rows = int(valid.any(-1).sum())
    if rows < 2:
        return kv_index.new_zeros(0)
    visits = torch.bincount(kv_index[valid], minlength=num_kv_blocks)
    return torch.nonzero(visits == rows).flatten()


@functools.lru_cache(maxsize=64)
def build_plan(pattern: Pattern, layout: BlockLayout) -> Plan:
    KB = layout.num_kv_blocks
    heads = []
    for h in range(layout.num_heads):
        head = h if pattern.num_heads is not None else None
        kv_index, kind = layout.kv_index[h], layout.kind[h]  # (QB, K), valid entries first
        valid = kind != EMPTY
        # Key blocks every row visits become one segment whose chunks run as a single tall
        # item (many query blocks against the same keys: the kernel's most efficient shape),
        # merged with the rest of each row through the log-sum-exp.
        cols = _column_blocks(kv_index, valid, KB)
        in_cols = torch.isin(kv_index, cols) & valid
        rest = valid & ~in_cols
        order = torch.argsort((~rest).to(torch.int8), dim=-1, stable=True)  # keep the rest first, sorted
        kv_rest, kind_rest, rest = kv_index.gather(-1, order), kind.gather(-1, order), rest.gather(-1, order)
        count = rest.sum(-1)
        partial = (rest & (kind_rest != FULL)).any(-1)
        segments = []
        for c, p in torch.unique(torch.stack([count, partial.long()], -1), dim=0).tolist():
            if c == 0:
                continue
            rows = torch.nonzero((count == c) & (partial == bool(p))).flatten()
            segments.append(_segment(rows, kv_rest[rows, :c], bool(p), pattern, layout, head))
        if cols.numel():
            rows = torch.nonzero(valid.any(-1)).flatten()
            col_partial = bool((in_cols & (kind != FULL)).any())
            kv = cols.view(1, -1).expand(rows.numel(), -1).contiguous()
            segments.append(_segment(rows, kv, col_partial, pattern, layout, head, fused=True))
        heads.append(tuple(segments))
    return Plan(layout, tuple(heads))
