"""Benchmark of the approximate mechanisms (issue 4): linear attention, Linformer, compressed, Nyström.

    python benchmarks/bench_approx.py                  # quick run (~2 min): N = 1024, 2048, 4096
    python benchmarks/bench_approx.py --full           # N = 1024 ... 65536, peers at 4096 and 16384
    .venv-bench/bin/python benchmarks/bench_approx.py --full --peers   # with performer-pytorch, linformer,
                                                                       # linear-attention-transformer

fp32, B=1, H=8, D=64. Method as in bench_core.py: contenders compared with each other are timed
alternately inside each repeat (order reversed every other repeat), each figure is the best of the
repeats, and every ratio is formed from figures of one group in one run. The peers are installed
only in the benchmark venv (see benchmarks/RESULTS.md for the command), never imported by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import (  # noqa: E402
    _fwd,
    _fwd_bwd,
    _layer_fwd_bwd,
    machine,
    md_table,
    ms,
    peak_fwd_bwd,
    time_group,
)

import sparse_attention as sa  # noqa: E402
from sparse_attention.approx import FavorPlus  # noqa: E402

B, H, D = 1, 8, 64
HIDDEN = H * D


def qkv(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=gen) for _ in range(3)]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def linear(causal, fmap="elu"):
    return lambda q, k, v: sa.linear_attention(q, k, v, feature_map=fmap, causal=causal)


def module_fn(m):
    return lambda q, k, v: m(q, k, v)


# ----------------------------------------------------------------------------- a. linear attention scaling


def bench_linear(args):
    print("## a. Linear attention (elu+1), fp32, B=1, H=8, D=64; best of", args.repeats, "ms")
    rows, best = [], {}
    for n in args.lengths:
        q, k, v = qkv(n)
        for mode, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
            group = {"linear": wrap(linear(False), q, k, v), "linear causal": wrap(linear(True), q, k, v)}
            dense_ok = n <= (args.sdpa_max_fwd if mode == "fwd" else args.sdpa_max_bwd)
            if dense_ok:
                group["SDPA"] = wrap(sdpa, q, k, v)
            res = time_group(group, args.repeats, label=f"{mode} N={n}" if args.verbose else "")["best"]
            for name, t in res.items():
                best[(name, mode, n)] = t
        r = [n]
        for mode in ("fwd", "fwd+bwd"):
            lin, cau = best[("linear", mode, n)], best[("linear causal", mode, n)]
            sd = best.get(("SDPA", mode, n))
            r += [ms(lin), ms(cau), ms(sd) if sd else "-", f"{lin / cau:.2f}",
                  f"{sd / lin:.1f}x / {sd / cau:.1f}x" if sd else "-"]
        rows.append(r)
        print(f"  N={n} done", flush=True)
    print(md_table(["N", "fwd linear", "fwd causal", "fwd SDPA", "causal/non-causal throughput",
                    "SDPA time / linear (non-causal / causal)", "fwd+bwd linear", "fwd+bwd causal",
                    "fwd+bwd SDPA", "causal/non-causal throughput", "SDPA time / linear"], rows))
    if 4096 in args.lengths and max(args.lengths) > 4096:
        top = max(args.lengths)
        print(f"\ntime({top}) / time(4096) (target <= {top // 4096} x 1.15 = {top / 4096 * 1.15:.1f}):")
        for name in ("linear", "linear causal"):
            for mode in ("fwd", "fwd+bwd"):
                print(f"  {name:14s} {mode:8s} {best[(name, mode, top)] / best[(name, mode, 4096)]:.1f}")
    return best


# ----------------------------------------------------------------------------- b. shortened K/V vs SDPA


def bench_short(args):
    print("\n## b. Linformer(k=256), Compressed(w=3, s=3), Nyström(m=64) vs dense SDPA; best of",
          args.repeats, "ms")
    rows = []
    for n in [n for n in args.lengths if 2048 <= n <= args.sdpa_max_bwd]:
        q, k, v = qkv(n)
        mods = {
            "Linformer": sa.nn.LinformerAttention(n, 256),
            "Compressed": sa.nn.CompressedAttention(3, head_dim=D),
            "Nystrom": sa.nn.NystromAttention(64),
        }
        for mode, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
            group = {name: wrap(module_fn(m), q, k, v) for name, m in mods.items()}
            group["SDPA"] = wrap(sdpa, q, k, v)
            res = time_group(group, args.repeats)["best"]
            rows.append([n, mode] + [f"{ms(res[name])} ({res['SDPA'] / res[name]:.1f}x)" for name in mods]
                        + [ms(res["SDPA"])])
        print(f"  N={n} done", flush=True)
    print(md_table(["N", "pass", "Linformer (SDPA/it)", "Compressed (SDPA/it)", "Nystrom (SDPA/it)", "SDPA"], rows))


# ----------------------------------------------------------------------------- d. memory

MEM_CONTENDERS = ("linear", "linear causal", "FAVOR+", "Linformer", "Compressed", "Nystrom")


def mem_contender(name, n):
    return {
        "linear": lambda: linear(False),
        "linear causal": lambda: linear(True),
        "FAVOR+": lambda: linear(False, FavorPlus(D, seed=0)),
        "Linformer": lambda: module_fn(sa.nn.LinformerAttention(n, 256)),
        "Compressed": lambda: module_fn(sa.nn.CompressedAttention(3, head_dim=D)),
        "Nystrom": lambda: module_fn(sa.nn.NystromAttention(64)),
    }[name]()


def mem_child(n, name):
    """Runs in a fresh subprocess: peak RSS of one fwd+bwd above the inputs (see bench_core.peak_fwd_bwd)."""
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_(True) for t in qkv(n))
    g = torch.randn(B, H, n, D)
    rec = peak_fwd_bwd(mem_contender(name, n), q, k, v, g)
    print("MEMJSON " + json.dumps({"N": n, "what": name, **rec}), flush=True)


def bench_memory(args):
    print("\n## d. Forward+backward peak memory above the inputs (fresh process per figure, 2nd call), MiB")
    peaks = {}
    for name in MEM_CONTENDERS:
        for n in args.mem_lengths:
            cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", str(n), "--_mem-what", name]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("MEMJSON ")]
            if p.returncode != 0 or not line:
                print(f"memory child N={n} {name} failed (rc={p.returncode}): {p.stderr[-1500:]}")
                continue
            rec = json.loads(line[0][8:])
            peaks[(name, n)] = rec["warm"]["peak_above_inputs"]  # the 1st call also holds one-time library set-up
    lo, hi = args.mem_lengths[0], args.mem_lengths[-1]
    rows = []
    for name in MEM_CONTENDERS:
        r = [name] + [f"{peaks[(name, n)] / 2**20:.0f}" if (name, n) in peaks else "-" for n in args.mem_lengths]
        if (name, lo) in peaks and (name, hi) in peaks:
            r.append(f"{peaks[(name, hi)] / peaks[(name, lo)]:.1f} (linear: {hi / lo:.0f})")
        rows.append(r)
    inputs = [f"{4 * B * H * n * D * 4 / 2**20:.0f}" for n in args.mem_lengths]
    print(md_table(["mechanism"] + [f"N={n}" for n in args.mem_lengths] + [f"peak({hi}) / peak({lo})"],
                   [["(q, k, v, grad_out themselves)"] + inputs + ["-"]] + rows))
    print("\nThe peak includes the output, the q/k/v gradients (3 × the size of q), saved tensors and "
          "workspace; an O(N) mechanism's ratio is the ratio of the lengths.")


# ----------------------------------------------------------------------------- c. peers


class _Layer(torch.nn.Module):
    """x (B, N, 512) -> q/k/v projections -> core (B, H, N, D) -> output projection; the peers' layout."""

    def __init__(self, core, bias_out=True):
        super().__init__()
        self.to_q = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.to_k = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.to_v = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.to_out = torch.nn.Linear(HIDDEN, HIDDEN, bias=bias_out)
        self.core = core

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, H, D).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        out = q + k + v if self.core is None else self.core(q, k, v)  # (B, H, N, D); None: projections alone
        return self.to_out(out.transpose(1, 2).reshape(b, n, HIDDEN))


class _SelfAttention(torch.nn.Module):
    """x -> layer(x, x, x, need_weights=False)[0] (torch's MultiheadAttention call)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, x, x, need_weights=False)[0]


def bench_peers(args):
    try:
        from linear_attention_transformer.linear_attention_transformer import causal_linear_attn, linear_attn
        from linformer import LinformerSelfAttention
        from performer_pytorch import FastAttention
    except ImportError as e:
        print(f"\n## c. peers skipped ({e}); install them into the benchmark venv, see benchmarks/RESULTS.md")
        return
    print("\n## c. vs performer-pytorch, linformer, linear-attention-transformer; fwd+bwd, best of",
          args.peer_repeats, "ms")
    rows = []
    for n in args.peer_lengths:
        q, k, v = qkv(n)
        m = round(D * torch.log(torch.tensor(float(D))).item())  # 266
        for causal in (False, True):
            # performer-pytorch's CPU causal path materialises N/128 x F x D per chunk: ~16 s at N=4096
            if not (causal and n > args.performer_causal_max):
                fm = FavorPlus(D, m, seed=0)
                theirs = FastAttention(D, nb_features=m, causal=causal)
                group = {"ours FAVOR+": _fwd_bwd(linear(causal, fm), q, k, v),
                         "performer-pytorch": _fwd_bwd(lambda a, b, c, t=theirs: t(a, b, c), q, k, v)}
                r = time_group(group, args.peer_repeats)["best"]
                rows.append([n, f"FAVOR+ m={m}" + (" causal" if causal else ""), "performer-pytorch FastAttention",
                             ms(r["ours FAVOR+"]), ms(r["performer-pytorch"]),
                             f"{r['performer-pytorch'] / r['ours FAVOR+']:.1f}x", "3x"])
            lat = (lambda a, b, c: causal_linear_attn(a, b, c, bucket_size=64)) if causal else linear_attn
            group = {"ours elu": _fwd_bwd(linear(causal), q, k, v), "lat": _fwd_bwd(lat, q, k, v)}
            r = time_group(group, args.peer_repeats)["best"]
            peer = "causal_linear_attn(bucket 64)" if causal else "linear_attn"
            rows.append([n, "linear attention (ours elu+1)" + (" causal" if causal else ""),
                         "linear-attention-transformer " + peer,
                         ms(r["ours elu"]), ms(r["lat"]), f"{r['lat'] / r['ours elu']:.1f}x", "1.5x"])
        torch.manual_seed(0)
        ours = _Layer(sa.nn.LinformerAttention(n, 256))
        theirs = LinformerSelfAttention(HIDDEN, n, k=256, heads=H)
        x = torch.randn(B, n, HIDDEN)
        mha = _SelfAttention(sa.nn.MultiheadAttention(HIDDEN, H, attention=sa.nn.LinformerAttention(n, 256)))
        with torch.no_grad():  # the same weights as `ours` (no input biases, like the peer): the same function
            mha.layer.in_proj_weight.copy_(torch.cat([ours.to_q.weight, ours.to_k.weight, ours.to_v.weight]))
            mha.layer.in_proj_bias.zero_()
            mha.layer.out_proj.load_state_dict(ours.to_out.state_dict())
            mha.layer.attention.load_state_dict(ours.core.state_dict())
            diff = (mha(x) - ours(x)).abs().max().item()
        group = {"ours": _layer_fwd_bwd(ours, x), "linformer": _layer_fwd_bwd(theirs, x),
                 "ours MHA": _layer_fwd_bwd(mha, x),
                 "projections": _layer_fwd_bwd(_Layer(None), x)}  # the 4 projections alone, same group
        r = time_group(group, args.peer_repeats)["best"]
        rows.append([n, "Linformer k=256 layer (dim 512, q/k/v/out projections)", "linformer LinformerSelfAttention",
                     ms(r["ours"]), ms(r["linformer"]), f"{r['linformer'] / r['ours']:.1f}x", "3x"])
        rows.append([n, f"  the same in sa.nn.MultiheadAttention (E applied before the projections; max |diff| "
                        f"{diff:.1e})", "linformer LinformerSelfAttention",
                     ms(r["ours MHA"]), ms(r["linformer"]), f"{r['linformer'] / r['ours MHA']:.1f}x", "3x"])
        t_p, t_o, t_l = r["projections"], r["ours"], r["linformer"]
        core = f"{(t_l - t_p) / (t_o - t_p):.1f}x" if t_o - t_p > 0.1 * t_o else "n/a: ours ~ projections"
        rows.append([n, f"  the same without the 4 projections ({ms(t_p)} ms alone, same group)",
                     "linformer LinformerSelfAttention", ms(t_o - t_p), ms(t_l - t_p), core, "3x"])
        print(f"  N={n} done", flush=True)
    print(md_table(["N", "what", "peer", "ours ms", "peer ms", "peer / ours", "target"], rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="N = 1024 ... 65536, peers at 4096 and 16384")
    p.add_argument("--peers", action="store_true", help="compare with the peer packages (benchmark venv)")
    p.add_argument("--only", choices=["linear", "short", "memory", "peers"], default=None)
    p.add_argument("--_mem-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_mem-what", default="linear", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args._mem_child:
        return mem_child(args._mem_child, args._mem_what)
    args.mem_lengths = [4096, 16384, 65536] if args.full else [4096, 16384]
    args.lengths = [1024, 2048, 4096, 8192, 16384, 32768, 65536] if args.full else [1024, 2048, 4096]
    args.peer_lengths = [4096, 16384] if args.full else [4096]
    args.repeats = args.repeats or (3 if args.full else 5)
    args.peer_repeats = 3 if args.full else 3
    args.sdpa_max_fwd = 16384  # dense SDPA beyond this takes minutes
    args.sdpa_max_bwd = 8192
    args.performer_causal_max = 4096
    torch.manual_seed(0)
    print(machine() if callable(machine) else "")
    print(f"load average at start: {os.getloadavg()}")
    if args.only in (None, "linear"):
        bench_linear(args)
    if args.only in (None, "short"):
        bench_short(args)
    if args.only in (None, "memory"):
        bench_memory(args)
    if args.peers and args.only in (None, "peers"):
        bench_peers(args)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
