"""The row-wise top-k that TopK and Routing select with: the native kernel against torch.topk.

    python benchmarks/bench_native_topk.py            # S = 1024 ... 16384, k = 32 ... 128
    python benchmarks/bench_native_topk.py --rows 4096 --repeats 9

Each case is one chunk of TopK scores, (rows, S) float32 of random normal values (rows = 1024 is
B·H·chunk = 8 · 128, TopK's chunk at these lengths). Contenders, timed alternately inside each
repeat (order reversed every other repeat), best of the repeats:

- native: sparse_attention.native.topk_rows (the kernel of sparse_attention/native/topk.c);
- torch.topk: one call over the rows, ``sorted=False``;
- torch two-level: sparse_attention.dynamic.topk._torch_top_k (the path without a compiler).

All three return the same values per row (checked before timing); each ratio compares two figures of
one case in one run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sparse_attention import native
from sparse_attention.dynamic.topk import _torch_top_k

CASES = [(1024, 64), (4096, 32), (4096, 64), (16384, 64), (16384, 128)]


def contenders(s: torch.Tensor, k: int) -> dict:
    return {"native": lambda: native.topk_rows(s, k), "topk": lambda: s.topk(k, dim=-1, sorted=False),
            "two-level": lambda: _torch_top_k(s, k)}


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn()
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {native.status()}")
    print(f"load average at start {os.getloadavg()}\n")
    print("| S | k | rows | native ms | torch.topk ms | torch two-level ms | topk / native | two-level / native |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for S, k in CASES:
        s = torch.randn(args.rows, S, generator=gen)
        fns = contenders(s, k)
        want = s.topk(k, dim=-1).values
        for name, fn in fns.items():
            got = fn()[0].sort(-1, descending=True).values
            if not torch.equal(got, want):
                raise SystemExit(f"{name} at S={S} k={k}: not the k largest values")
        t = best_times(fns, args.repeats)
        print(f"| {S} | {k} | {args.rows} | {t['native'] * 1e3:.2f} | {t['topk'] * 1e3:.2f} | "
              f"{t['two-level'] * 1e3:.2f} | {t['topk'] / t['native']:.1f}x | {t['two-level'] / t['native']:.1f}x |")
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
