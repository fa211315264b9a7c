"""Effect of transparent huge pages for PyTorch's CPU allocator (THP_MEM_ALLOC_ENABLE=1) on our mechanisms.

    python benchmarks/bench_thp.py            # N = 16384 (dense SDPA and TopK at 4096), 3 rounds

PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so each figure comes from a fresh
process with the variable set or unset. The two settings alternate process by process for several
rounds; each figure is the best fwd+bwd time (fp32, B=1, H=8, D=64) over every repeat of every round,
and the ratio is formed from the two best figures of one mechanism. With the variable set, tensors
of 2 MB and more are allocated on huge pages (madvise): the kernel then faults in a fresh tensor
2 MB at a time instead of 4 kB at a time, which matters to code that allocates tens of MB per call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

B, H, D = 1, 8, 64


def contenders(n_long: int, n_dense: int):
    """name -> (length, builder of a core(q, k, v))."""
    import torch

    import sparse_attention as sa
    from sparse_attention.nn.content_based import ReformerAttention, RoutingAttention, SinkhornAttention

    def module(m):
        return lambda q, k, v: m(q, k, v)

    return {
        "dense SDPA": (n_dense, lambda: torch.nn.functional.scaled_dot_product_attention),
        "SlidingWindow(256)": (n_long, lambda: lambda q, k, v: sa.attention(q, k, v, sa.SlidingWindow(256))),
        "TopK(64)": (n_dense, lambda: lambda q, k, v: sa.attention(q, k, v, sa.TopK(64))),
        "ProbSparse": (n_long, lambda: lambda q, k, v: sa.attention(q, k, v, sa.ProbSparse(seed=0))),
        "LSH(64)": (n_long, lambda: lambda q, k, v: sa.attention(q, k, v, sa.LSH(64))),
        "ReformerAttention (shared QK)": (n_long, lambda: (lambda m: lambda q, k, v: m(q, v))(
            ReformerAttention(64, n_buckets=n_long // 64))),
        "RoutingAttention (eval)": (n_long, lambda: module(RoutingAttention(n_long // 64, D, H).eval())),
        "SinkhornAttention (train)": (n_long, lambda: module(SinkhornAttention(D, H, 64).train())),
        "linear attention (elu+1)": (n_long, lambda: lambda q, k, v: sa.linear_attention(q, k, v)),
        "linear attention causal": (n_long, lambda: lambda q, k, v: sa.linear_attention(q, k, v, causal=True)),
    }


def child(name: str, n_long: int, n_dense: int, repeats: int) -> None:
    import torch

    n, build = contenders(n_long, n_dense)[name]
    core = build()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, n, D, generator=gen)
    best = float("inf")
    for i in range(repeats + 1):
        q.grad = k.grad = v.grad = None
        t = time.perf_counter()
        core(q, k, v).backward(g)
        if i:  # the first call is a warm-up
            best = min(best, time.perf_counter() - t)
    print("THPJSON " + json.dumps({"name": name, "n": n, "best": best}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="length of the sub-quadratic mechanisms")
    p.add_argument("--n-dense", type=int, default=4096, help="length of dense SDPA and TopK")
    p.add_argument("--rounds", type=int, default=3, help="processes per setting and mechanism")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        return child(args._child, args.n, args.n_dense, args.repeats)
    print(f"load average at start: {os.getloadavg()}")
    best: dict[tuple[str, str], float] = {}
    names = list(contenders(args.n, args.n_dense))
    for r in range(args.rounds):
        for name in names:
            settings = ("0", "1") if r % 2 == 0 else ("1", "0")  # alternate which setting runs first
            for thp in settings:
                env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
                cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, "--n", str(args.n),
                       "--n-dense", str(args.n_dense), "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("THPJSON ")]
                if out.returncode or not line:
                    raise SystemExit(f"{name} (THP_MEM_ALLOC_ENABLE={thp}) failed:\n{out.stderr[-2000:]}")
                rec = json.loads(line[0][8:])
                key = (name, thp)
                best[key] = min(best.get(key, float("inf")), rec["best"])
        print(f"  round {r + 1} done", flush=True)
    print(f"load average at end: {os.getloadavg()}\n")
    print("| mechanism | N | fwd+bwd ms, unset | fwd+bwd ms, THP_MEM_ALLOC_ENABLE=1 | speed-up |")
    print("|---|---|---|---|---|")
    for name in names:
        n = contenders(args.n, args.n_dense)[name][0]
        off, on = best[(name, "0")], best[(name, "1")]
        print(f"| {name} | {n} | {off * 1e3:.1f} | {on * 1e3:.1f} | {off / on:.2f}x |")


if __name__ == "__main__":
    main()
