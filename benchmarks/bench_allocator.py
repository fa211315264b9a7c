"""Effect of process-wide CPU allocator settings on our mechanisms (none is set by the library).

    python benchmarks/bench_allocator.py                   # --setting thp: THP_MEM_ALLOC_ENABLE=1
    python benchmarks/bench_allocator.py --setting glibc   # glibc malloc keeps freed memory (below)
    python benchmarks/bench_allocator.py --setting no-advice  # the library's own huge-page advice off

Fresh tensors of tens of MB are page-faulted in 4 kB at a time (about 0.25 ms per MB here), which
matters to code that allocates large outputs or temporaries on every call. Two remedies, both read
once at process start, so each figure comes from a fresh process with the setting on or off:

- ``thp``: PyTorch's THP_MEM_ALLOC_ENABLE=1 puts tensors of 2 MB and more on transparent huge pages
  (madvise), faulted in 2 MB at a time.
- ``glibc``: GLIBC_TUNABLES raising glibc malloc's mmap and trim thresholds to 1 GiB: allocations
  below that come from the heap, and freed memory stays in the process for the next call instead of
  going back to the OS (by default glibc maps anything over 32 MB afresh on every allocation). The
  cost: memory freed by a call is not returned to the OS; the table reports peak RSS for both.
- ``no-advice``: the library's own remedy switched off (``SPARSE_ATTENTION_HUGE_PAGES=0``). By default the
  native kernels' large outputs, and Sinkhorn's sorted keys and values, are advised to be transparent huge
  pages before first touch (``sparse_attention.native.empty``); a ratio below 1 is what the advice gains.

The two states alternate process by process for several rounds; each figure is the best fwd+bwd
time (fp32, B=1, H=8, D=64) over every repeat of every round, and the ratio is formed from the two
best figures of one mechanism.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

B, H, D = 1, 8, 64
SETTINGS = {  # name -> (environment variable, value when on); off = the variable removed
    "thp": ("THP_MEM_ALLOC_ENABLE", "1"),
    "glibc": ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"),
    "no-advice": ("SPARSE_ATTENTION_HUGE_PAGES", "0"),
}


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
    import resource

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
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports kB)
    print("ALLOCJSON " + json.dumps({"name": name, "n": n, "best": best, "rss": rss}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="length of the sub-quadratic mechanisms")
    p.add_argument("--n-dense", type=int, default=4096, help="length of dense SDPA and TopK")
    p.add_argument("--rounds", type=int, default=3, help="processes per setting and mechanism")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    p.add_argument("--setting", choices=list(SETTINGS), default="thp", help="what to switch on (default thp)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        return child(args._child, args.n, args.n_dense, args.repeats)
    var, value = SETTINGS[args.setting]
    print(f"{args.setting}: {var}={value}; load average at start: {os.getloadavg()}")
    best: dict[tuple[str, bool], float] = {}
    rss: dict[tuple[str, bool], float] = {}
    names = list(contenders(args.n, args.n_dense))
    for r in range(args.rounds):
        for name in names:
            for on in ((False, True) if r % 2 == 0 else (True, False)):  # alternate which state runs first
                env = {key: val for key, val in os.environ.items() if key != var}
                if on:
                    env[var] = value
                cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, "--n", str(args.n),
                       "--n-dense", str(args.n_dense), "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("ALLOCJSON ")]
                if out.returncode or not line:
                    raise SystemExit(f"{name} ({var} {'set' if on else 'unset'}) failed:\n{out.stderr[-2000:]}")
                rec = json.loads(line[0][len("ALLOCJSON "):])
                best[(name, on)] = min(best.get((name, on), float("inf")), rec["best"])
                rss[(name, on)] = max(rss.get((name, on), 0.0), rec["rss"])
        print(f"  round {r + 1} done", flush=True)
    print(f"load average at end: {os.getloadavg()}\n")
    print(f"| mechanism | N | fwd+bwd ms, unset | fwd+bwd ms, {args.setting} | unset / {args.setting} | "
          f"peak RSS MiB, unset | peak RSS MiB, {args.setting} |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        n = contenders(args.n, args.n_dense)[name][0]
        off, on = best[(name, False)], best[(name, True)]
        print(f"| {name} | {n} | {off * 1e3:.1f} | {on * 1e3:.1f} | {off / on:.2f}x | {rss[(name, False)]:.0f} | "
              f"{rss[(name, True)]:.0f} |")


if __name__ == "__main__":
    main()
