"""From a block layout to a plan of kernel calls.

A *segment* is one batched kernel call: R items, each one query block against the
concatenation of K key blocks, all of one kind:

* FULL: no mask at all (the kernel's fastest path);
* CAUSAL / ANTICAUSAL: one diagonal-triangle block, run with ``is_causal`` (the
  anti-causal one on row- and column-reversed blocks), no mask tensor;
* MASKED: an explicit element mask evaluated from the pattern's predicate.

Items are grouped by kind and by K so each segment is a dense batch. When the key
blocks of every item form one run whose start advances by a fixed step (sliding
windows, block-local), the engine reads K/V through a strided view instead of
gathering them. The plan depends only on (layout, pattern) and is cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..patterns.base import ANTICAUSAL, CAUSAL, FULL, MASKED, BlockLayout, Pattern


@dataclass(frozen=True, eq=False)
class Segment:
    kind: int
    rows: torch.Tensor  # (R,) query block of each item (distinct within a segment)
    kv: torch.Tensor  # (R, K) key blocks of each item
    row_start: int | None  # rows == row_start + arange(R) when not None
    kv_run: tuple[int, int] | None  # (start, step): kv[r, t] == start + r*step + t when not None
    mask: torch.Tensor | None  # (R, b, K*b) bool for MASKED, else None

    @property
    def num_items(self) -> int:
        return self.rows.numel()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.shape[1]


@dataclass(frozen=True, eq=False)
class Plan:
    layout: BlockLayout
    heads: tuple[tuple[Segment, ...], ...]  # per layout head (1 when shared by all heads)

    @property
    def block(self) -> int:
        return self.layout.block


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


def _segment(kind, rows, kv, pattern, layout, head) -> Segment:
    R, K = kv.shape
    row_start = _arith_start(rows)
    row_start = row_start[0] if row_start is not None and row_start[1] == 1 else None
    kv_run = None
    if K and torch.equal(kv, kv[:, :1] + torch.arange(K, device=kv.device)):
        kv_run = _arith_start(kv[:, 0])
    mask = None
    if kind == MASKED:
        b = layout.block
        ar = torch.arange(b, device=kv.device)
        qi = (rows * b).view(R, 1, 1) + ar.view(1, b, 1)  # (R, b, 1)
        ki = (kv.unsqueeze(-1) * b + ar).reshape(R, 1, K * b)  # (R, 1, K*b)
        m = pattern.allowed(qi, ki, n_q=layout.n_q, n_k=layout.n_k, head=head)
        mask = (m & (ki < layout.n_k)).expand(R, b, K * b).contiguous()
    return Segment(kind, rows, kv, row_start, kv_run, mask)


@functools.lru_cache(maxsize=64)
def build_plan(pattern: Pattern, layout: BlockLayout) -> Plan:
    heads = []
    for h in range(layout.num_heads):
        head = h if pattern.num_heads is not None else None
        kv_index, kind = layout.kv_index[h], layout.kind[h]  # (QB, K)
        segments: list[Segment] = []
        for k in (FULL, MASKED):
            sel = kind == k
            count = sel.sum(-1)
            for c in torch.unique(count).tolist():
                if c == 0:
                    continue
                rows = torch.nonzero(count == c).flatten()
                kv = kv_index[rows][sel[rows]].view(-1, c)
                segments.append(_segment(k, rows, kv, pattern, layout, head))
        for k in (CAUSAL, ANTICAUSAL):
            # one item per triangle block; a row with several goes into several segments
            sel = kind == k
            occurrence = sel.cumsum(-1) * sel
            for j in range(1, int(occurrence.max()) + 1 if sel.any() else 1):
                rows, col = torch.nonzero(occurrence == j, as_tuple=True)
                segments.append(_segment(k, rows, kv_index[rows, col].view(-1, 1), pattern, layout, head))
        heads.append(tuple(segments))
    return Plan(layout, tuple(heads))
