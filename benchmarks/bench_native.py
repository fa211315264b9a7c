"""The native selection kernels (sparse_attention/native) against the PyTorch ops they replace.

    python benchmarks/bench_native.py              # top-k, LSH buckets and bucket order, LSH._chunks
    python benchmarks/bench_native.py --repeats 9

Contenders of one case are timed alternately inside each repeat (order reversed every other repeat),
best of the repeats; every ratio compares two figures of one case in one run. Each case checks first
that the contenders agree.

a. Row-wise top-k (TopK's and Routing's selection) on one chunk of TopK scores: (rows, S) float32 of
   random normal values (rows = 1024 is B·H·chunk = 8 · 128, TopK's chunk at these lengths):
   native.topk_rows, one torch.topk call (``sorted=False``), and dynamic/topk.py's _torch_top_k (two
   levels; the path without a compiler).
b. LSH buckets from projections (rows, half): native.lsh_buckets against abs().argmax() + gather +
   compare (LSH.hash's PyTorch path); and the order of tokens by bucket, (8, L) ids in [0, nb]:
   native.bucket_order against torch.sort(ids · L + position).
c. LSH._chunks (hash q and k, order by bucket, chunk ids) at B=1, H=8, D=64, bucket 64, with the
   native kernels and with them switched off in the same process.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import sparse_attention as sa
from sparse_attention import native
from sparse_attention.dynamic.topk import _torch_top_k


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


def topk_contenders(s: torch.Tensor, k: int) -> dict:
    return {"native": lambda: native.topk_rows(s, k), "topk": lambda: s.topk(k, dim=-1, sorted=False),
            "two-level": lambda: _torch_top_k(s, k)}


def torch_buckets(p: torch.Tensor) -> torch.Tensor:
    col = p.abs().argmax(-1, keepdim=True)
    return (col + p.shape[-1] * (p.gather(-1, col) < 0)).squeeze(-1)


def torch_order(b: torch.Tensor) -> torch.Tensor:
    L = b.shape[-1]
    return torch.sort(b * L + torch.arange(L), dim=-1).indices


class NativeOff:
    """Switches the LSH kernels off (their callers then take the PyTorch path) inside a with block."""

    def __enter__(self):
        self.saved = native.lsh_buckets, native.bucket_order
        native.lsh_buckets, native.bucket_order = (lambda p: None), (lambda b, values: None)

    def __exit__(self, *exc):
        native.lsh_buckets, native.bucket_order = self.saved


def chunks_contenders(mech, q, k) -> dict:
    def off():
        with NativeOff():
            return mech._chunks(q, k)
    return {"native": lambda: mech._chunks(q, k), "torch": off}


def native_vs_torch(fns: dict, repeats: int, what: str) -> str:
    """Checks that fns["native"] and fns["torch"] return equal results, times both; the table cells
    'native ms | PyTorch ms | ratio'."""
    a, b = fns["native"](), fns["torch"]()
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    if not all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in pairs):
        raise SystemExit(f"{what}: the native and PyTorch results differ")
    t = best_times(fns, repeats)
    return f"{ms(t['native'])} | {ms(t['torch'])} | {t['torch'] / t['native']:.1f}x"


def ms(t: float) -> str:
    return f"{t * 1e3:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024, help="rows of scores in (a) (default 1024)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {native.status()}")
    print(f"load average at start {os.getloadavg()}\n")
    gen = torch.Generator().manual_seed(0)

    print("a. row-wise top-k\n")
    print("| S | k | rows | native ms | torch.topk ms | torch two-level ms | topk / native | two-level / native |")
    print("|---|---|---|---|---|---|---|---|")
    for S, k in [(1024, 64), (4096, 32), (4096, 64), (16384, 64), (16384, 128)]:
        s = torch.randn(args.rows, S, generator=gen)
        fns = topk_contenders(s, k)
        want = s.topk(k, dim=-1).values
        for name, fn in fns.items():
            if not torch.equal(fn()[0].sort(-1, descending=True).values, want):
                raise SystemExit(f"{name} at S={S} k={k}: not the k largest values")
        t = best_times(fns, args.repeats)
        print(f"| {S} | {k} | {args.rows} | {ms(t['native'])} | {ms(t['topk'])} | {ms(t['two-level'])} | "
              f"{t['topk'] / t['native']:.1f}x | {t['two-level'] / t['native']:.1f}x |")

    print("\nb. LSH buckets (rows of projections) and bucket order\n")
    print("| step | shape | native ms | PyTorch ms | PyTorch / native |")
    print("|---|---|---|---|---|")
    for rows, half in [(16384, 64), (4096, 256), (1024, 1024)]:  # one LSH.hash block each (N = 4096, 16384, 65536)
        p = torch.randn(rows, half, generator=gen)
        fns = {"native": lambda p=p: native.lsh_buckets(p), "torch": lambda p=p: torch_buckets(p)}
        print(f"| buckets | ({rows}, {half}) | {native_vs_torch(fns, args.repeats, f'buckets, half={half}')} |")
    for L in [4096, 16384, 65536]:
        nb = 2 * round(L / 64)
        b = torch.randint(0, nb + 1, (8, L), generator=gen)
        fns = {"native": lambda b=b, nb=nb: native.bucket_order(b, nb + 1), "torch": lambda b=b: torch_order(b)}
        print(f"| order | (8, {L}), {nb + 1} ids | {native_vs_torch(fns, args.repeats, f'order, L={L}')} |")

    print("\nc. LSH._chunks (hash q and k, order, chunk ids), B=1, H=8, D=64, bucket 64\n")
    print("| N | native ms | PyTorch ms | PyTorch / native |")
    print("|---|---|---|---|")
    mech = sa.LSH(bucket_size=64, seed=0)
    for N in [4096, 16384]:
        q, k = (torch.randn(1, 8, N, 64, generator=gen) for _ in range(2))
        print(f"| {N} | {native_vs_torch(chunks_contenders(mech, q, k), args.repeats, f'LSH._chunks, N={N}')} |")
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
