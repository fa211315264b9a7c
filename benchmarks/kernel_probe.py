"""Measure the fused CPU attention kernel on the batch shapes the block-sparse engine uses.

    python benchmarks/kernel_probe.py

The engine's plan (one call per query block over all of its key blocks, an additive
mask where needed, no separate is_causal calls) and the block-size cost model in
sparse_attention/engine/tuning.py rest on these figures: the kernel's rate by
query-tile height, what ``is_causal`` saves on a diagonal block, and what an additive
mask costs. fp32, 8 (batch x head) rows, N = 16384 query rows in total; best of 5.
"""

from __future__ import annotations

import functools
import time

import torch

KERNEL = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
BH, N, D = 8, 16384, 64


def best_of(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, BH, N, D)
    t = best_of(lambda: KERNEL(q, q, q, 0.0, False, scale=0.125), 2)
    dense = 4 * D * BH * N * N / t
    print(f"dense kernel, N={N}: {dense / 1e9:.0f} GFLOP/s\n")
    print("| query rows per item | keys per item | no mask ms | rate / dense | is_causal ms | shared mask ms "
          "| per-item mask ms |")
    print("|---|---|---|---|---|---|---|")
    for b, L in ((64, 576), (128, 640), (256, 768), (256, 256), (512, 1024)):
        R = N // b
        qb, kb = torch.randn(BH, R, b, D), torch.randn(BH, R, L, D)
        shared = torch.zeros(1, 1, b, L)
        shared[..., :5] = float("-inf")
        per_item = shared.expand(1, R, b, L).contiguous()
        call = functools.partial(KERNEL, qb, kb, kb, 0.0, scale=0.125)
        t0 = best_of(functools.partial(call, False))
        tc = best_of(functools.partial(call, True))
        ts = best_of(functools.partial(call, False, attn_mask=shared))
        ti = best_of(functools.partial(call, False, attn_mask=per_item))
        rate = 4 * D * BH * R * b * L / t0
        print(f"| {b} | {L} | {t0 * 1e3:.1f} | {rate / dense:.2f} | {tc * 1e3:.1f} | {ts * 1e3:.1f} | {ti * 1e3:.1f} |")


if __name__ == "__main__":
    main()
