"""Cost before running: how many pairs a pattern keeps and what computing them costs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_float_dtype, check_int
from .patterns.base import Pattern


@dataclass(frozen=True)
class PatternStats:
    n_q: int
    n_k: int
    attended_pairs: int  # allowed (query, key) pairs per head (averaged over heads for per-head patterns)
    density: float  # attended_pairs / (N * S)
    flops_forward: int  # 4 * B * H * D * attended_pairs (QK^T and PV): the useful work
    flops_dense: int  # the same for dense attention
    computed_pairs: int  # pairs the block-sparse engine computes per head (whole blocks)
    block: int
    peak_memory_bytes: int  # block-sparse engine, forward+backward, above the inputs (estimate)
    dense_scores_bytes: int  # the B x H x N x S score matrix a naive implementation materialises

    def __str__(self) -> str:
        gib = 1 << 30
        return (
            f"N={self.n_q} S={self.n_k}: {self.attended_pairs} pairs/head, density {self.density:.4f}, "
            f"{self.flops_forward / 1e9:.2f} GFLOP forward (dense {self.flops_dense / 1e9:.2f}), "
            f"engine computes {self.computed_pairs} pairs/head at block {self.block}, "
            f"peak memory ~{self.peak_memory_bytes / gib:.3f} GiB "
            f"(an N x S score matrix: {self.dense_scores_bytes / gib:.3f} GiB)"
        )


def pattern_stats(pattern: Pattern, n_q: int, n_k: int, *, num_heads: int = 1, num_kv_heads: int | None = None,
                  head_dim: int = 64, batch: int = 1, dtype: torch.dtype = torch.float32,
                  block: int | None = None) -> PatternStats:
    """Attended pairs, density, FLOPs and estimated peak memory, from the block layout alone.

    Pairs are counted exactly from the layout (the predicate is evaluated on visited
    blocks only, never on N x S). The memory estimate adds up what the block-sparse
    engine allocates for a forward+backward pass (the output, the saved LSE, float32
    gradient accumulators, padded or converted copies and its largest chunk of work, about
    24 MB, less for a small call); for
    SlidingWindow(256), H=8, D=64 it gives 0.15 / 0.53 GiB at N = 16384 / 65536 where
    benchmarks/bench_core.py measured 0.16 / 0.54 GiB (warm call).

    Arguments: N = ``n_q`` and S = ``n_k`` >= 0; H = ``num_heads`` >= 1; ``num_kv_heads`` Hkv (default
    None = H) must divide H; D = ``head_dim`` >= 1; B = ``batch`` >= 0; ``dtype`` float16, bfloat16,
    float32 or float64; ``block`` >= 1, default None = the engine's own choice (``choose_block``).
    Anything else raises ValueError/TypeError naming the argument.
    """
    from .engine.blocksparse import chunk_bytes
    from .engine.plan import build_plan
    from .engine.tuning import choose_block

    # every argument checked before any work (num_heads=0 divided by zero, batch=-1 gave negative FLOPs)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparse_attention.Pattern, got {type(pattern).__name__}")
    n_q = check_int("n_q", n_q, minimum=0)
    n_k = check_int("n_k", n_k, minimum=0)
    H = check_int("num_heads", num_heads, minimum=1)
    Hkv = H if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, minimum=1)
    if H % Hkv:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads, got num_heads={H}, num_kv_heads={Hkv}")
    head_dim = check_int("head_dim", head_dim, minimum=1)
    batch = check_int("batch", batch, minimum=0)  # B=0 is a valid (empty) attention call
    dtype = check_float_dtype("dtype", dtype)
    # None = choose the block; block=0 is an error, not "automatic"
    b = choose_block(pattern, n_q, n_k, H // Hkv) if block is None else check_int("block", block, minimum=1)
    layout = pattern.layout(n_q, n_k, b)
    plan = build_plan(pattern, layout)
    pairs = 0
    computed = 0
    for segments in plan.heads:
        for seg in segments:
            computed += seg.num_items * b * seg.num_kv_blocks * b
            for lo in range(0, seg.num_items, 64):
                hi = min(seg.num_items, lo + 64)
                m = seg.item_mask(lo, hi)
                if m is None:  # every visited pair allowed; count real queries and keys only
                    q_real = torch.clamp(n_q - seg.rows[lo:hi] * b, 0, b)
                    pairs += int((q_real * seg.num_kv_blocks * b).sum())
                else:
                    m = m.expand(hi - lo, *m.shape[1:])
                    q_real = (seg.rows[lo:hi] * b).view(-1, 1) + torch.arange(b) < n_q  # (R, b)
                    pairs += int((m & q_real.unsqueeze(-1)).sum())
    Hl = layout.num_heads
    per_head_pairs = pairs / Hl
    computed //= Hl
    itemsize = torch.empty((), dtype=dtype).element_size()
    D = head_dim
    QBb, KBb = -(-n_q // b) * b, -(-n_k // b) * b
    G = H // Hkv
    q_copy = QBb != n_q or G > 1  # queries (and the upstream gradient) are folded by a copy
    kv_copy = KBb != n_k
    half = itemsize < 4
    per_batch = (
        H * QBb * (D * 4 + 4)  # float32 output accumulator (kept for the backward when fp32) and lse
        + (H * QBb * D * itemsize if half else 0)  # the output in the input dtype
        + (H * QBb * D * itemsize * 2 if q_copy else 0)  # folded q and upstream gradient
        + (2 * Hkv * KBb * D * itemsize if kv_copy else 0)  # padded k, v
        + (H * QBb * D + 2 * Hkv * KBb * D) * 4  # float32 dq, dk, dv (returned as they are for fp32)
        + ((H * n_q * D + 2 * Hkv * n_k * D) * itemsize if half or q_copy or kv_copy else 0)  # converted grads
    )
    QB = QBb // b
    chunk = max((chunk_bytes(segments, batch * Hkv, QB, b, G, D, itemsize) for segments in plan.heads),
                default=0) if batch else 0  # (an empty batch runs nothing)
    peak = batch * per_batch + chunk  # (the engine's chunks: about ROW_CHUNK_BYTES, less for a small call)
    return PatternStats(n_q, n_k, int(per_head_pairs), per_head_pairs / max(n_q * n_k, 1),
                        int(4 * batch * H * D * per_head_pairs), 4 * batch * H * D * n_q * n_k, computed, b,
                        int(peak), batch * H * n_q * n_k * itemsize)
