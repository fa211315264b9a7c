"""The pattern protocol, the block layout every engine executes, and composition.

A pattern answers two questions (DESIGN.md):

1. ``allowed(q_idx, kv_idx, n_q=N, n_k=S)``: the element-wise truth, vectorised over
   broadcastable int64 index tensors (FlexAttention's ``mask_mod`` idea). ``mask(N, S)``
   materialises it; it is the reference every engine is tested against.
2. ``layout(N, S, block)``: for each query block, the key blocks holding at least one
   allowed pair, each classified as full / causal triangle / anti-causal triangle /
   general mask. Patterns propose *candidate* key blocks analytically (O(blocks kept));
   the layout then evaluates the predicate on those candidate blocks only, so building
   it costs O(kept pairs), never O(N·S).

Alignment when N != S: query ``i`` sits at key position ``i + (S - N)`` (bottom-right,
as flash-attn does), so a single new query at the end of a cache sees its own window.
Causal with N=2, S=5 (``x`` = allowed)::

    key j:    0 1 2 3 4
    query 0:  x x x x .      (position 3)
    query 1:  x x x x x      (position 4)

With N > S the leading queries sit at negative positions; under a causal pattern they
see no key and their output is 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._checks import check_int

# Block kinds in a layout. The engine runs each kind with its cheapest kernel call.
EMPTY, FULL, CAUSAL, ANTICAUSAL, MASKED = 0, 1, 2, 3, 4

# Elements evaluated at once while classifying candidate blocks (bounds build memory).
_CLASSIFY_CHUNK = 1 << 24


def query_positions(q_idx: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """Key-space position of each query index (bottom-right alignment)."""
    return q_idx + (n_k - n_q)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block visits, and how.

    Attributes:
        n_q, n_k: the lengths N and S the layout was built for.
        block: the block size (query and key blocks are both ``block`` long; the last
            of each may be shorter).
        kv_index: (Hl, QB, K) int64, per query block the visited key blocks in
            ascending order, padded at the end with ``num_kv_blocks`` (a sentinel).
            Hl is 1 when every head shares the layout, else the number of heads.
        kind: (Hl, QB, K) int8, one of FULL, CAUSAL (j <= i inside the block),
            ANTICAUSAL (j >= i), MASKED (anything else), EMPTY on the padding.
    """

    n_q: int
    n_k: int
    block: int
    kv_index: torch.Tensor
    kind: torch.Tensor

    @property
    def num_q_blocks(self) -> int:
        return self.kv_index.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.n_k // self.block)

    @property
    def num_heads(self) -> int:
        return self.kv_index.shape[0]

    @property
    def full(self) -> torch.Tensor:
        """(Hl, QB, K) bool: blocks that need no element mask."""
        return self.kind == FULL

    @property
    def valid(self) -> torch.Tensor:
        return self.kind != EMPTY

    def to_dense(self) -> torch.Tensor:
        """(Hl, QB, KB) bool block matrix: True where a block is visited. For plots and tests."""
        Hl, QB, K = self.kv_index.shape
        dense = torch.zeros(Hl, QB, self.num_kv_blocks + 1, dtype=torch.bool, device=self.kv_index.device)
        dense.scatter_(2, self.kv_index, self.valid)
        return dense[..., :-1]

    def blocks_kept(self) -> int:
        return int(self.valid.sum())


class Pattern:
    """Base class of every static pattern.

    Subclasses implement ``allowed`` and ``_candidates``; everything else (dense mask,
    block layout, cost estimate, composition) comes from here.
    """

    #: number of heads this pattern distinguishes; None when every head is the same.
    num_heads: int | None = None

    # --- to implement -------------------------------------------------------------
    def allowed(
        self, q_idx: torch.Tensor, kv_idx: torch.Tensor, *, n_q: int, n_k: int, head: int | None = None
    ) -> torch.Tensor:
        """Bool tensor, True where query ``q_idx`` may attend key ``kv_idx``.

        Args:
            q_idx: int64 query indices in [0, N) (any shape broadcastable with kv_idx).
            kv_idx: int64 key indices in [0, S).
            n_q, n_k: the lengths N and S (for the alignment and length-dependent patterns).
            head: for per-head patterns, evaluate this head only (shared patterns ignore it).
        Returns:
            bool of the broadcast shape; per-head patterns called with ``head=None`` add a
            leading head dimension (H, ...).
        """
        raise NotImplementedError

    def _candidates(self, n_q: int, n_k: int, block: int, device: torch.device) -> torch.Tensor:
        """(Hl, QB, K) int64 key blocks that may hold an allowed pair, sorted, padded with KB.

        A superset is fine (empty blocks are dropped by the layout); missing a block is a bug.
        """
        raise NotImplementedError

    def check_lengths(self, n_q: int, n_k: int) -> None:
        """Raise ValueError if this pattern cannot be used with these lengths."""

    # --- derived ------------------------------------------------------------------
    def mask(self, n_q: int, n_k: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense bool mask, (N, S) or (H, N, S) for per-head patterns. For tests and plots only."""
        n_q = check_int("n_q", n_q, minimum=0)
        n_k = check_int("n_k", n_k, minimum=0)
        self.check_lengths(n_q, n_k)
        qi = torch.arange(n_q, device=device).unsqueeze(-1)
        ki = torch.arange(n_k, device=device)
        m = self.allowed(qi, ki, n_q=n_q, n_k=n_k)
        return m.expand(*m.shape[:-2], n_q, n_k).clone()

    def layout(self, n_q: int, n_k: int, block: int, device: torch.device | str | None = None) -> BlockLayout:
        """The block layout for lengths N, S and a block size (cached per arguments)."""
        n_q = check_int("n_q", n_q, minimum=0)
        n_k = check_int("n_k", n_k, minimum=0)
        block = check_int("block", block, minimum=1)
        self.check_lengths(n_q, n_k)
        return _build_layout(self, n_q, n_k, block, torch.device(device or "cpu"))

    def stats(
        self,
        n_q: int,
        n_k: int | None = None,
        *,
        num_heads: int = 1,
        num_kv_heads: int | None = None,
        head_dim: int = 64,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        block: int | None = None,
    ):
        """Cost before running: attended pairs, density, FLOPs, estimated peak memory.

        See :func:`sparse_attention.cost.pattern_stats` (``num_kv_heads``: grouped-query attention's key/value
        heads, default None = ``num_heads``).
        """
        from ..cost import pattern_stats

        return pattern_stats(
            self, n_q, n_q if n_k is None else n_k, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, batch=batch, dtype=dtype, block=block,
        )

    def __or__(self, other: object) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        return Union(self, other)

    def __and__(self, other: object) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        return Intersection(self, other)

    # Patterns are immutable values: equal when their parameters are.
    def _key(self) -> tuple:
        return (type(self).__name__, tuple(sorted(vars(self).items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# --- candidate helpers ----------------------------------------------------------------


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_position_range(n_q: int, n_k: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(QB,) first and last key-space position of every query block."""
    QB = num_blocks(n_q, block)
    start = torch.arange(QB, device=device) * block
    last = torch.clamp(start + block, max=n_q) - 1
    return query_positions(start, n_q, n_k), query_positions(last, n_q, n_k)


def candidates_from_ranges(lo: torch.Tensor, hi: torch.Tensor, n_k: int, block: int) -> torch.Tensor:
    """Key blocks covering key positions [lo, hi] (inclusive) per query block -> (1, QB, K).

    Positions are clipped to [0, n_k); an empty range gives a row of sentinels.
    """
    KB = num_blocks(n_k, block)
    lo_b = torch.clamp(lo, min=0) // block
    hi_b = torch.clamp(hi, max=n_k - 1)
    hi_b = torch.where(hi_b >= 0, hi_b // block, torch.full_like(hi_b, -1))
    count = torch.clamp(hi_b - lo_b + 1, min=0)
    K = int(count.max()) if count.numel() else 0
    idx = lo_b.unsqueeze(-1) + torch.arange(K, device=lo.device)
    idx = torch.where(torch.arange(K, device=lo.device) < count.unsqueeze(-1), idx, torch.full_like(idx, KB))
    return idx.unsqueeze(0)


def all_candidates(n_q: int, n_k: int, block: int, device) -> torch.Tensor:
    QB, KB = num_blocks(n_q, block), num_blocks(n_k, block)
    return torch.arange(KB, device=device).expand(1, QB, KB)


def dedupe_sorted_rows(idx: torch.Tensor, sentinel: int) -> torch.Tensor:
    """Sort each row, replace repeats by the sentinel, trim columns that are all sentinel."""
    idx, _ = torch.sort(idx, dim=-1)
    if idx.shape[-1] > 1:
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
        idx = torch.where(dup, torch.full_like(idx, sentinel), idx)
        idx, _ = torch.sort(idx, dim=-1)
    keep = int((idx != sentinel).sum(-1).max()) if idx.numel() else 0
    return idx[..., :keep].contiguous()


def _broadcast_heads(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    H = max(a.shape[0], b.shape[0])
    return a.expand(H, *a.shape[1:]), b.expand(H, *b.shape[1:])


# --- composition ----------------------------------------------------------------------


def _merged_heads(parts: tuple[Pattern, ...]) -> int | None:
    heads = {p.num_heads for p in parts if p.num_heads is not None}
    if len(heads) > 1:
        raise ValueError(f"cannot combine per-head patterns with different head counts {sorted(heads)}")
    return heads.pop() if heads else None


class _Combination(Pattern):
    """Shared machinery of ``a | b`` and ``a & b``: flattening, validation, the predicate."""

    _op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    _symbol: str

    def __init__(self, *parts: Pattern):
        flat: list[Pattern] = []
        for p in parts:
            if not isinstance(p, Pattern):
                raise TypeError(f"{type(self).__name__} parts must be Patterns, got {type(p).__name__}")
            flat.extend(p.parts if type(p) is type(self) else (p,))
        self.parts = tuple(flat)
        self.num_heads = _merged_heads(self.parts)

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        out = self.parts[0].allowed(q_idx, kv_idx, n_q=n_q, n_k=n_k, head=head)
        for p in self.parts[1:]:
            out = type(self)._op(out, p.allowed(q_idx, kv_idx, n_q=n_q, n_k=n_k, head=head))
        return out

    def check_lengths(self, n_q, n_k):
        for p in self.parts:
            p.check_lengths(n_q, n_k)

    def __repr__(self) -> str:
        return f" {self._symbol} ".join(
            f"({p!r})" if isinstance(p, _Combination) else repr(p) for p in self.parts
        )


class Union(_Combination):
    """``a | b``: a pair is allowed when any part allows it."""

    _op = torch.logical_or
    _symbol = "|"

    def _candidates(self, n_q, n_k, block, device):
        KB = num_blocks(n_k, block)
        cands = [p._candidates(n_q, n_k, block, device) for p in self.parts]
        H = max(c.shape[0] for c in cands)
        cat = torch.cat([c.expand(H, *c.shape[1:]) for c in cands], dim=-1)
        return dedupe_sorted_rows(cat, KB)


class Intersection(_Combination):
    """``a & b``: a pair is allowed when every part allows it."""

    _op = torch.logical_and
    _symbol = "&"

    def _candidates(self, n_q, n_k, block, device):
        KB = num_blocks(n_k, block)
        out = self.parts[0]._candidates(n_q, n_k, block, device)
        for p in self.parts[1:]:
            a, b = _broadcast_heads(out, p._candidates(n_q, n_k, block, device))
            if b.shape[-1] == 0:
                a = torch.full_like(a, KB)
            else:
                pos = torch.searchsorted(b.contiguous(), a.contiguous()).clamp(max=b.shape[-1] - 1)
                member = (b.gather(-1, pos) == a) & (a != KB)
                a = torch.where(member, a, torch.full_like(a, KB))
            out = dedupe_sorted_rows(a, KB)
        return out


class PerHead(Pattern):
    """A different pattern per head: head ``h`` uses ``patterns[h]``.

    Used as ``PerHead([p0, p1, ...])``; the attention call must have exactly
    ``len(patterns)`` query heads.
    """

    def __init__(self, patterns):
        if isinstance(patterns, Pattern) or not hasattr(patterns, "__iter__"):
            raise TypeError(f"PerHead takes a sequence of Patterns, got {type(patterns).__name__}")
        patterns = tuple(patterns)
        if not patterns:
            raise ValueError("PerHead needs at least one pattern, got an empty sequence")
        for i, p in enumerate(patterns):
            if not isinstance(p, Pattern):
                raise TypeError(f"patterns[{i}] must be a Pattern, got {type(p).__name__}")
            if p.num_heads is not None:
                raise ValueError(f"patterns[{i}] is itself per-head ({p!r}); nest PerHead is not supported")
        self.patterns = patterns
        self.num_heads = len(patterns)

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        if head is not None:
            if not 0 <= head < self.num_heads:
                raise ValueError(f"head must be in [0, {self.num_heads}), got {head}")
            return self.patterns[head].allowed(q_idx, kv_idx, n_q=n_q, n_k=n_k)
        shape = torch.broadcast_shapes(q_idx.shape, kv_idx.shape)
        return torch.stack(
            [torch.broadcast_to(p.allowed(q_idx, kv_idx, n_q=n_q, n_k=n_k), shape) for p in self.patterns]
        )

    def _candidates(self, n_q, n_k, block, device):
        KB = num_blocks(n_k, block)
        cands = [p._candidates(n_q, n_k, block, device)[0] for p in self.patterns]
        K = max(c.shape[-1] for c in cands)
        return torch.stack([torch.nn.functional.pad(c, (0, K - c.shape[-1]), value=KB) for c in cands])

    def check_lengths(self, n_q, n_k):
        for p in self.patterns:
            p.check_lengths(n_q, n_k)

    def __repr__(self) -> str:
        return f"PerHead({list(self.patterns)!r})"


# --- layout construction --------------------------------------------------------------


def _classify(m: torch.Tensor, row_ok: torch.Tensor, tril: torch.Tensor, triu: torch.Tensor) -> torch.Tensor:
    """Kind of each (.., b, b) block mask; rows where ``row_ok`` is False are don't-care."""

    def matches(template: torch.Tensor | None) -> torch.Tensor:
        eq = m if template is None else (m == template)
        return (eq | ~row_ok).flatten(-2).all(-1)

    kind = torch.full(m.shape[:-2], MASKED, dtype=torch.int8, device=m.device)
    kind[matches(triu)] = ANTICAUSAL
    kind[matches(tril)] = CAUSAL
    kind[matches(None)] = FULL
    kind[~(m & row_ok).flatten(-2).any(-1)] = EMPTY
    return kind


def classify_candidates(
    pattern: Pattern, cand: torch.Tensor, n_q: int, n_k: int, block: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Kind (int8) of every candidate block, for all query-block rows or only ``rows``.

    cand: (Hl, QB, K) candidate key blocks. Returns (Hl, len(rows) or QB, K). The
    predicate is evaluated on the candidate blocks only, in chunks of _CLASSIFY_CHUNK.
    """
    device = cand.device
    KB = num_blocks(n_k, block)
    if rows is None:
        rows = torch.arange(cand.shape[1], device=device)
    cand = cand[:, rows]
    Hl, R, K = cand.shape
    kind = torch.zeros(Hl, R, K, dtype=torch.int8, device=device)
    ar = torch.arange(block, device=device)
    tril = ar.view(-1, 1) >= ar.view(1, -1)  # (b, b): j <= i
    triu = ar.view(-1, 1) <= ar.view(1, -1)
    per_chunk = max(1, _CLASSIFY_CHUNK // (block * block))
    for h in range(Hl):
        head = h if pattern.num_heads is not None else None
        # only real candidates are evaluated (rows have different counts; padding is skipped)
        r_idx, k_idx = torch.nonzero(cand[h] != KB, as_tuple=True)
        for p0 in range(0, r_idx.numel(), per_chunk):
            r, j = r_idx[p0 : p0 + per_chunk], k_idx[p0 : p0 + per_chunk]
            qi = (rows[r] * block).view(-1, 1, 1) + ar.view(1, -1, 1)  # (P, b, 1)
            ki = (cand[h, r, j] * block).view(-1, 1, 1) + ar.view(1, 1, -1)  # (P, 1, b)
            m = pattern.allowed(qi, ki, n_q=n_q, n_k=n_k, head=head) & (ki < n_k)  # (P, b, b)
            row_ok = (qi < n_q).expand_as(m)  # rows past N are don't-care
            kind[h, r, j] = _classify(m, row_ok, tril, triu)
    return kind


@functools.lru_cache(maxsize=64)
def _build_layout(pattern: Pattern, n_q: int, n_k: int, block: int, device: torch.device) -> BlockLayout:
    KB = num_blocks(n_k, block)
    cand = pattern._candidates(n_q, n_k, block, device)  # (Hl, QB, K)
    kind = classify_candidates(pattern, cand, n_q, n_k, block)
    # drop empty candidates: move them to the end and trim
    kv = torch.where(kind != EMPTY, cand, torch.full_like(cand, KB))
    order = torch.argsort(kv, dim=-1, stable=True)
    kv = kv.gather(-1, order)
    kind = kind.gather(-1, order)
    keep = int((kind != EMPTY).sum(-1).max()) if kind.numel() else 0
    return BlockLayout(n_q, n_k, block, kv[..., :keep].contiguous(), kind[..., :keep].contiguous())


__all__ = [
    "Pattern", "Union", "Intersection", "PerHead", "BlockLayout",
    "EMPTY", "FULL", "CAUSAL", "ANTICAUSAL", "MASKED",
]


class Composite(Pattern):
    """A preset defined as a composition of other patterns (Longformer, BigBird).

    Subclasses implement ``compose(n_q, n_k)``; everything is delegated to the result,
    so a preset adds no code path of its own.
    """

    def compose(self, n_q: int, n_k: int) -> Pattern:
        raise NotImplementedError

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        return self.compose(n_q, n_k).allowed(q_idx, kv_idx, n_q=n_q, n_k=n_k, head=head)

    def _candidates(self, n_q, n_k, block, device):
        return self.compose(n_q, n_k)._candidates(n_q, n_k, block, device)

    def check_lengths(self, n_q, n_k):
        self.compose(n_q, n_k).check_lengths(n_q, n_k)


def candidates_from_block_matrix(blocks: torch.Tensor) -> torch.Tensor:
    """(QB, KB) bool block matrix -> (1, QB, K) padded candidate rows."""
    QB, KB = blocks.shape
    idx = torch.where(blocks, torch.arange(KB, device=blocks.device), torch.full_like(blocks, KB, dtype=torch.long))
    return dedupe_sorted_rows(idx, KB).unsqueeze(0)
