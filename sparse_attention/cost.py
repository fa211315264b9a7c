"""Cost before running: how many pairs a pattern keeps and what computing them costs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .patterns.base import Pattern


@dataclass(frozen=True)
class PatternStats:
    n_q: int
    n_k: int
    attended_pairs: int  # allowed (query, key) pairs, summed over pattern heads (per head for shared)
    density: float  # attended_pairs / (N * S) (averaged over heads for per-head patterns)
    flops_forward: int  # 4 * B * H * D * pairs (QK^T and PV), the useful work
    flops_dense: int  # the same for dense attention
    computed_pairs: int  # pairs the block-sparse engine computes (whole blocks), per head
    block: int
    peak_memory_bytes: int  # block-sparse engine, forward+backward, above the inputs (estimate)
    dense_peak_memory_bytes: int  # dense SDPA with a materialised mask, forward+backward (estimate)

    def __str__(self) -> str:
        gb = 1 << 30
        return (
            f"N={self.n_q} S={self.n_k}: {self.attended_pairs} pairs, density {self.density:.4f}, "
            f"{self.flops_forward / 1e9:.2f} GFLOP forward (dense {self.flops_dense / 1e9:.2f}), "
            f"engine computes {self.computed_pairs} pairs at block {self.block}, "
            f"peak memory ~{self.peak_memory_bytes / gb:.3f} GiB (dense ~{self.dense_peak_memory_bytes / gb:.3f} GiB)"
        )


def pattern_stats(pattern: Pattern, n_q: int, n_k: int, *, num_heads: int = 1, head_dim: int = 64, batch: int = 1,
                  dtype: torch.dtype = torch.float32, block: int | None = None) -> PatternStats:
    """Attended pairs, density, FLOPs and estimated peak memory, computed from the layout alone.

    Pairs are counted exactly from the block layout (the predicate is evaluated on
    the visited blocks only, never on N x S).
    """
    from .engine.tuning import choose_block

    b = block or choose_block(pattern, n_q, n_k)
    layout = pattern.layout(n_q, n_k, b)
    plan_pairs = 0
    pairs = 0
    ar = torch.arange(b)
    for h in range(layout.num_heads):
        head = h if pattern.num_heads is not None else None
        kv, valid = layout.kv_index[h], layout.valid[h]
        rows, cols = torch.nonzero(valid, as_tuple=True)
        for i in range(0, rows.numel(), 4096):
            r, c = rows[i : i + 4096], kv[rows[i : i + 4096], cols[i : i + 4096]]
            qi = (r * b).view(-1, 1, 1) + ar.view(1, -1, 1)
            ki = (c * b).view(-1, 1, 1) + ar.view(1, 1, -1)
            m = pattern.allowed(qi, ki, n_q=n_q, n_k=n_k, head=head) & (qi < n_q) & (ki < n_k)
            pairs += int(m.sum())
        plan_pairs += int(valid.sum()) * b * b
    heads_in_layout = layout.num_heads
    per_head_pairs = pairs / heads_in_layout
    itemsize = torch.empty((), dtype=dtype).element_size()
    H = num_heads
    flops = int(4 * batch * H * head_dim * per_head_pairs)
    computed = plan_pairs // heads_in_layout
    # engine: out/lse/grad accumulators in fp32 (~6 N*D per head) + one chunk of gathered K/V
    from .engine.blocksparse import CHUNK_BYTES

    acc = batch * H * n_q * head_dim * 4 * 6 + batch * H * n_k * head_dim * 4 * 4
    peak = acc + min(CHUNK_BYTES, computed // max(n_q, 1) * 2 * head_dim * itemsize * batch * H * max(n_q, 1) // b)
    dense_peak = batch * H * n_q * n_k * (itemsize * 3 + 1) + acc
    return PatternStats(n_q, n_k, int(per_head_pairs), per_head_pairs / max(n_q * n_k, 1), flops,
                        4 * batch * H * head_dim * n_q * n_k, computed, b, int(peak), int(dense_peak))
