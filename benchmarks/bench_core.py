"""sparse_attention core benchmark / demo.

    python benchmarks/bench_core.py                 # quick run (< 3 min): patterns vs dense SDPA
    python benchmarks/bench_core.py --full          # the complete measurements (several minutes)
    python benchmarks/bench_core.py --full --json results.json

Method. CPU speed on shared machines drifts over minutes (up to ~1.7x here), so
  * contenders that are compared are timed *alternately* inside each repeat
    (the order is reversed on every other repeat),
  * each contender's figure is the *best* (minimum) of the repeats,
  * every ratio is formed from two figures measured in the same group, in the same run.
Useful FLOPs of a pattern are 4*H*D*attended_pairs per batch element (QK^T and PV,
2 FLOPs per multiply-add), dense SDPA's are 4*H*D*N^2; fwd+bwd counts 3x the forward
FLOPs for both, so the fwd+bwd fraction is the ratio of useful-FLOP rates.

Peer libraries (HF transformers for section d) are imported lazily; install them with
    pip install -r benchmarks/requirements-peers.txt -c <constraints pinning torch==2.13.0>
(see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention.bench import _release_free_memory

B, H, D = 1, 8, 64
HIDDEN = H * D  # 512


# ----------------------------------------------------------------------------- timing


def _fwd(fn, q, k, v):
    def run():
        with torch.no_grad():
            fn(q, k, v)
    return run


def _fwd_bwd(fn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with torch.no_grad():
        g = torch.randn(fn(q, k, v).shape, dtype=q.dtype)

    def run():
        out = fn(q, k, v)
        out.backward(g)
        q.grad = k.grad = v.grad = None
    return run


def _layer_fwd_bwd(module, x):
    """A runner of module(x).backward(g) for a (B, N, E) layer (fixed random g), clearing grads."""
    x = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        g = torch.randn_like(module(x))

    def run():
        module(x).backward(g)
        x.grad = None
        module.zero_grad(set_to_none=True)
    return run


def time_group(contenders: dict, repeats: int, warmup: int = 1, label: str = "", warm=None) -> dict:
    """Alternate contenders inside each repeat; return {name: best seconds} and all samples.

    ``warm``: names that get ``warmup`` untimed calls first (default: all). Dense SDPA has no
    plan to build, so the long dense runs skip warm-up; best-of-repeats covers first-touch costs.
    """
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            if warm is None or n in warm:
                contenders[n]()
    samples = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            contenders[n]()
            samples[n].append(time.perf_counter() - t0)
        if label:
            print(f"  [{label}] repeat {r + 1}/{repeats}: "
                  + ", ".join(f"{n}={samples[n][-1] * 1e3:.0f}ms" for n in names), flush=True)
    return {"best": {n: min(s) for n, s in samples.items()}, "samples": samples}


def qkv(n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=gen).to(dtype) for _ in range(3)]


def ours(pattern):
    return lambda q, k, v: sa.attention(q, k, v, pattern)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def pairs(pattern, n):
    return pattern.stats(n, num_heads=H, head_dim=D).attended_pairs


def useful_flops(pattern, n):
    """Forward useful FLOPs for B=1, all heads. pattern=None means dense."""
    p = n * n if pattern is None else pairs(pattern, n)
    return 4 * H * D * p


def md_table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def ms(t):
    return f"{t * 1e3:.1f}"


# ----------------------------------------------------------------------------- quick run


QUICK_PATTERNS = {
    "SlidingWindow(256)": lambda: sa.SlidingWindow(256),
    "Longformer(256,[0])": lambda: sa.Longformer(256, global_indices=[0]),
    "BigBird(64,3,2,3)": lambda: sa.BigBird(block=64, window_blocks=3, global_blocks=2, random_blocks=3),
    "Causal()": lambda: sa.Causal(),
}


def quick(args, results):
    rows = []
    for n in args.lengths:
        q, k, v = qkv(n)
        pats = {name: mk() for name, mk in QUICK_PATTERNS.items()}
        for mode, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
            contenders = {"dense SDPA": wrap(sdpa, q, k, v), "SDPA is_causal": wrap(sdpa_causal, q, k, v)}
            contenders.update({name: wrap(ours(p), q, k, v) for name, p in pats.items()})
            res = time_group(contenders, args.repeats, warmup=1, label=f"N={n} {mode}", warm=set(pats))
            t_dense = res["best"]["dense SDPA"]
            dense_rate = useful_flops(None, n) / t_dense
            rows.append(["dense SDPA", n, mode, "1.000", ms(t_dense), ms(t_dense), "1.00x", "1.00"])
            for name in ["SDPA is_causal"] + list(pats):
                t = res["best"][name]
                p = sa.Causal() if name == "SDPA is_causal" else pats[name]
                pr = pairs(p, n)
                frac = (useful_flops(p, n) / t) / dense_rate
                label = name if name == "SDPA is_causal" else f"sa {name}"
                rows.append([label, n, mode, f"{pr / n / n:.3f}", ms(t), ms(t_dense), f"{t_dense / t:.2f}x",
                             f"{frac:.2f}"])
                results["quick"].append({"contender": label, "N": n, "mode": mode, "density": pr / n / n,
                                         "seconds": t, "dense_sdpa_seconds": t_dense,
                                         "speedup_vs_dense": t_dense / t, "useful_flops_fraction_of_dense": frac,
                                         "samples": res["samples"][name]})
            del contenders
            gc.collect()
    print()
    print(f"### Patterns vs dense SDPA (fp32, B={B}, H={H}, D={D}; best of {args.repeats}, alternated)")
    print()
    print(md_table(["contender", "N", "mode", "density", "time ms", "dense SDPA ms", "speedup",
                    "useful FLOP/s / dense"], rows))
    print()


# ----------------------------------------------------------------------------- full: a, b, e


def flex_contender(n, window):
    """Compiled flex_attention with the equivalent BlockMask; returns (fn, info) or (None, failure text)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= window

        t0 = time.perf_counter()
        bm = create_block_mask(mask_mod, None, None, n, n, device="cpu")
        t_mask = time.perf_counter() - t0
        compiled = torch.compile(flex_attention)
        q, k, v = qkv(n)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = compiled(q, k, v, block_mask=bm)
        t_compile = time.perf_counter() - t0
        with torch.no_grad():
            ref = sa.attention(q, k, v, sa.SlidingWindow(window))
        err = (out - ref).abs().max().item()
        return (lambda q, k, v: compiled(q, k, v, block_mask=bm)), {
            "block_mask_seconds": t_mask, "first_call_incl_compile_seconds": t_compile,
            "max_abs_diff_vs_sparse_attention": err}
    except Exception as e:  # noqa: BLE001 - report whatever went wrong
        return None, f"{type(e).__name__}: {str(e)[:2000]}"


def full_speed(args, results):
    n, window = args.n, 256
    pat = sa.SlidingWindow(window)
    f_ours, f_dense = useful_flops(pat, n), useful_flops(None, n)
    print(f"## a/b/e. SlidingWindow({window}) at N={n}, B={B}, H={H}, D={D}")
    print(f"attended pairs/head = {pairs(pat, n)} (density {pairs(pat, n) / n / n:.4f}); "
          f"useful fwd GFLOP = {f_ours / 1e9:.2f}, dense fwd GFLOP = {f_dense / 1e9:.2f}")
    print("compiling flex_attention (torch.compile, CPU) ...", flush=True)
    flex_fn, flex_info = flex_contender(n, window)
    if flex_fn is None:
        print(f"flex_attention FAILED: {flex_info}")
    else:
        print(f"flex compiled: {flex_info}")
    results["flex_info"] = flex_info

    q32, k32, v32 = qkv(n)
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q32, k32, v32))
    # forward group: ours fp32/bf16, dense SDPA fp32/bf16, flex fp32
    fwd = {"sa fp32": _fwd(ours(pat), q32, k32, v32), "sa bf16": _fwd(ours(pat), q16, k16, v16),
           "SDPA fp32": _fwd(sdpa, q32, k32, v32), "SDPA bf16": _fwd(sdpa, q16, k16, v16)}
    if flex_fn is not None:
        fwd["flex fp32"] = _fwd(flex_fn, q32, k32, v32)
    print("forward group ...", flush=True)
    rf = time_group(fwd, args.repeats_fwd, warmup=1, label="fwd", warm={"sa fp32", "sa bf16", "flex fp32"})
    del fwd
    gc.collect()
    fb = {"sa fp32": _fwd_bwd(ours(pat), q32, k32, v32), "sa bf16": _fwd_bwd(ours(pat), q16, k16, v16),
          "SDPA fp32": _fwd_bwd(sdpa, q32, k32, v32), "SDPA bf16": _fwd_bwd(sdpa, q16, k16, v16)}
    print("forward+backward group (dense SDPA takes a while) ...", flush=True)
    rb = time_group(fb, args.repeats_bwd, warmup=1, label="fwd+bwd", warm={"sa fp32", "sa bf16"})
    del fb
    gc.collect()
    results["speed_fwd"], results["speed_fwd_bwd"] = rf, rb

    def frac(res, a, d):
        return (f_ours / res["best"][a]) / (f_dense / res["best"][d])

    a_rows = []
    for mode, res, mult, target in (("fwd", rf, 1, 0.55), ("fwd+bwd", rb, 3, 0.45)):
        for dt in ("fp32", "bf16"):
            fr = frac(res, f"sa {dt}", f"SDPA {dt}")
            t_o, t_d = res["best"][f"sa {dt}"], res["best"][f"SDPA {dt}"]
            ok = ("MET" if fr >= target else "NOT MET") if dt == "fp32" else "-"
            a_rows.append([mode, dt, ms(t_o), ms(t_d), f"{mult * f_ours / t_o / 1e9:.1f}",
                           f"{mult * f_dense / t_d / 1e9:.1f}", f"{fr:.3f}",
                           f"{target if dt == 'fp32' else '-'}", ok])
            results.setdefault("fraction_of_dense", {})[f"{mode} {dt}"] = fr
    print()
    print(f"### a. Useful FLOP/s of sa.SlidingWindow({window}) as a fraction of dense SDPA's (N={n})")
    print()
    print(md_table(["mode", "dtype", "sa ms", "dense SDPA ms", "sa useful GFLOP/s", "SDPA GFLOP/s",
                    "fraction of dense", "target", "status"], a_rows))
    print()
    print(f"### b. vs torch.compile(flex_attention) + BlockMask(|q-kv|<={window}), forward fp32, N={n}")
    print()
    if flex_fn is None:
        print(f"flex_attention could not be run on this machine: {flex_info}")
    else:
        t_o, t_f = rf["best"]["sa fp32"], rf["best"]["flex fp32"]
        results["flex"] = {"sa_seconds": t_o, "flex_seconds": t_f, "ours_over_flex": t_o / t_f}
        print(md_table(["sa ms", "flex ms", "sa time / flex time", "flex first call (compile) s",
                        "max |sa - flex|"],
                       [[ms(t_o), ms(t_f), f"{t_o / t_f:.3f}", f"{flex_info['first_call_incl_compile_seconds']:.1f}",
                         f"{flex_info['max_abs_diff_vs_sparse_attention']:.2e}"]]))
    print()
    print(f"### e. bf16 vs fp32 (N={n}); speedup = fp32 time / bf16 time")
    print()
    e_rows = []
    for who in ("sa", "SDPA"):
        for mode, res in (("fwd", rf), ("fwd+bwd", rb)):
            t32, t16 = res["best"][f"{who} fp32"], res["best"][f"{who} bf16"]
            e_rows.append([("sa.SlidingWindow(256)" if who == "sa" else "dense SDPA"), mode, ms(t32), ms(t16),
                           f"{t32 / t16:.2f}x"])
            results.setdefault("bf16", []).append({"who": who, "mode": mode, "fp32_s": t32, "bf16_s": t16,
                                                   "fp32_over_bf16": t32 / t16})
    print(md_table(["contender", "mode", "fp32 ms", "bf16 ms", "bf16 speedup"], e_rows))
    print()


# ----------------------------------------------------------------------------- full: c (memory)


def _read_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    raise KeyError(field)


def peak_fwd_bwd(fn, q, k, v, g) -> dict:
    """Peak RSS of out = fn(q, k, v); out.backward(g), above the RSS before the call, twice (cold, warm).

    Run it in a fresh process: freed heap memory is handed back to the OS (malloc_trim) and the kernel's
    high-water mark (VmHWM) is reset to the current RSS by writing '5' to /proc/self/clear_refs, so the
    peak includes the output, gradients, saved tensors and workspace, and nothing from earlier work.
    """
    rec = {}
    for call in ("cold", "warm"):
        _release_free_memory()  # freed heap pages of an earlier call would otherwise hide in the base
        base = _read_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        hwm0 = _read_status("VmHWM")
        t0 = time.perf_counter()
        out = fn(q, k, v)
        out.backward(g)
        dt = time.perf_counter() - t0
        peak = _read_status("VmHWM")
        rec[call] = {"rss_before": base, "hwm_after_reset": hwm0, "peak": peak,
                     "peak_above_inputs": peak - base, "seconds": dt}
        del out
        q.grad = k.grad = v.grad = None
    return rec


def mem_child(n, what):
    """Runs in a fresh subprocess: peak RSS of one fwd+bwd above the RSS after creating inputs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D).requires_grad_(True) for _ in range(3))
    g = torch.randn(B, H, n, D)
    fn = sdpa if what == "dense" else ours(sa.SlidingWindow(256))
    out_rec = {"N": n, "what": what, "input_bytes": 4 * q.numel() * 4, **peak_fwd_bwd(fn, q, k, v, g)}
    print("MEMJSON " + json.dumps(out_rec), flush=True)


def full_memory(args, results):
    print("## c. Forward+backward peak memory above the inputs, SlidingWindow(256), fp32")
    print()
    runs = [(n, "sa") for n in args.mem_lengths] + ([(args.n, "dense")] if args.mem_dense else [])
    recs = []
    for n, what in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", str(n), "--_mem-what", what,
               "--threads", str(torch.get_num_threads())]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("MEMJSON ")]
        if p.returncode != 0 or not line:
            print(f"memory child N={n} {what} failed (rc={p.returncode}): {p.stderr[-2000:]}")
            continue
        recs.append(json.loads(line[0][8:]))
    results["memory"] = recs
    gib = 1024 ** 3
    rows = []
    for r in recs:
        peak = max(r["cold"]["peak_above_inputs"], r["warm"]["peak_above_inputs"])
        r["peak_above_inputs_max"] = peak
        rows.append([("sa.SlidingWindow(256)" if r["what"] == "sa" else "dense SDPA"), r["N"],
                     f"{r['input_bytes'] / gib:.3f}", f"{r['cold']['peak_above_inputs'] / gib:.3f}",
                     f"{r['warm']['peak_above_inputs'] / gib:.3f}", f"{peak / gib:.3f}"])
    print(md_table(["contender", "N", "q,k,v,grad_out GiB", "peak above inputs GiB (1st call)",
                    "(2nd call)", "max GiB"], rows))
    sa_recs = {r["N"]: r for r in recs if r["what"] == "sa"}
    if len(args.mem_lengths) == 2 and all(n in sa_recs for n in args.mem_lengths):
        lo, hi = (sa_recs[n]["peak_above_inputs_max"] for n in args.mem_lengths)
        ratio = hi / lo
        results["memory_ratio"] = ratio
        print()
        print(f"ratio N={args.mem_lengths[1]} / N={args.mem_lengths[0]}: {ratio:.2f} (target <= 4.6: "
              f"{'MET' if ratio <= 4.6 else 'NOT MET'}); N={args.mem_lengths[1]} peak = {hi / 1e9:.2f} GB "
              f"(target < 6 GB: {'MET' if hi < 6e9 else 'NOT MET'})")
    print()
    print("Method: each figure comes from a fresh subprocess. It creates q, k, v (requires_grad) and the output "
          "gradient, reads VmRSS, resets the kernel's high-water mark by writing '5' to /proc/self/clear_refs, "
          "runs out = attention(q, k, v); out.backward(grad_out), then reads VmHWM. Peak above inputs = VmHWM - "
          "VmRSS-before (includes the output, q/k/v gradients, saved tensors and workspace). The 1st call is "
          "cold (includes any plan building / caches), the 2nd is measured the same way in the same process.")
    print()


# ----------------------------------------------------------------------------- full: d (HF peers)


def full_hf(args, results):
    n = 4096
    print(f"## d. vs HF transformers modules, fwd+bwd, fp32, B=1, N={n}, hidden {HIDDEN}, {H} heads")
    print()
    try:
        import transformers
        from transformers import BigBirdConfig, LongformerConfig
        from transformers.models.big_bird.modeling_big_bird import BigBirdAttention, BigBirdModel
        from transformers.models.longformer.modeling_longformer import LongformerAttention
    except ImportError as e:
        msg = (f"HF transformers is not installed ({e}); skipping section d. Install the peers with: "
               "pip install -r benchmarks/requirements-peers.txt -c constraints.txt "
               "(constraints.txt containing torch==2.13.0)")
        print(msg)
        results["hf"] = {"skipped": msg}
        return
    torch.manual_seed(0)
    common = dict(hidden_size=HIDDEN, num_attention_heads=H, intermediate_size=4 * HIDDEN,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=n)
    # HF attention_window is the total window (both sides): 512 -> 256 each side.
    lcfg = LongformerConfig(attention_window=[512], num_hidden_layers=1, **common)
    hf_long = LongformerAttention(lcfg, layer_id=0).train()
    bcfg = BigBirdConfig(attention_type="block_sparse", block_size=64, num_random_blocks=3,
                         num_hidden_layers=1, **common)
    hf_bb = BigBirdAttention(bcfg, seed=0).train()

    x = torch.randn(B, n, HIDDEN)
    lmask = torch.zeros(B, n)
    lmask[:, 0] = 10000.0  # LongformerModel's convention: >0 global, 0 local, <0 padding
    l_kw = dict(attention_mask=lmask, is_index_masked=lmask < 0, is_index_global_attn=lmask > 0, is_global_attn=True)
    blocked, band, from_m, to_m = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(B, n), 64)
    b_kw = dict(band_mask=band, from_mask=from_m, to_mask=to_m, from_blocked_mask=blocked, to_blocked_mask=blocked)

    class Ours(torch.nn.Module):
        """Q/K/V/output projections (nn.Linear 512->512 x4) around sa.attention."""

        def __init__(self, pattern):
            super().__init__()
            self.pattern = pattern
            self.q, self.k, self.v, self.o = (torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(4))

        def forward(self, h):
            b, s, _ = h.shape
            q, k, v = (lin(h).view(b, s, H, D).transpose(1, 2) for lin in (self.q, self.k, self.v))
            return self.o(sa.attention(q, k, v, self.pattern).transpose(1, 2).reshape(b, s, HIDDEN))

    class Projections(Ours):
        """The same four projections with no attention between them (to separate the two costs)."""

        def forward(self, h):
            b, s, _ = h.shape
            q, k, v = (lin(h).view(b, s, H, D).transpose(1, 2) for lin in (self.q, self.k, self.v))
            return self.o((q + k + v).transpose(1, 2).reshape(b, s, HIDDEN))

    projections = Projections(None)
    ours_long = Ours(sa.Longformer(256, global_indices=[0]))
    ours_bb = Ours(sa.BigBird(block=64, window_blocks=3, global_blocks=2, random_blocks=3))

    def fb(module, kw):
        xx = x.clone().requires_grad_(True)
        gout = torch.randn(B, n, HIDDEN)

        def run():
            out = module(xx, **kw)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(gout)
            module.zero_grad(set_to_none=True)
            xx.grad = None
        return run

    rows = []
    results["hf"] = {"transformers_version": transformers.__version__}
    for name, hf_mod, hf_kw, our_mod in (("Longformer(256,[0])", hf_long, l_kw, ours_long),
                                         ("BigBird(64,3,2,3)", hf_bb, b_kw, ours_bb)):
        res = time_group({"HF": fb(hf_mod, hf_kw), "sa": fb(our_mod, {}), "proj": fb(projections, {})},
                         args.repeats_hf, warmup=1, label=f"HF {name}")
        t_hf, t_o, t_p = res["best"]["HF"], res["best"]["sa"], res["best"]["proj"]
        attn_ratio = (t_hf - t_p) / max(t_o - t_p, 1e-9)
        rows.append([name, ms(t_hf), ms(t_o), f"{t_hf / t_o:.2f}x", "MET" if t_hf / t_o >= 5 else "NOT MET",
                     ms(t_p), f"{attn_ratio:.2f}x"])
        results["hf"][name] = {"hf_seconds": t_hf, "sa_seconds": t_o, "projections_seconds": t_p,
                               "speedup": t_hf / t_o, "attention_only_speedup": attn_ratio,
                               "samples": res["samples"]}
    print()
    print(md_table(["pattern", "HF module ms", "sa + 4 Linear ms", "speedup", "target >= 5x",
                    "4 Linear alone ms", "speedup without the 4 Linear"], rows))
    print()
    print(f"HF modules (transformers {transformers.__version__}, built from config, random weights, train mode, "
          "dropout 0): LongformerAttention (LongformerSelfAttention + output dense/LayerNorm; attention_window=512, "
          "i.e. 256 each side, token 0 global; it also applies its query/key/value_global projections) and "
          "BigBirdAttention with attention_type='block_sparse' (BigBirdBlockSparseAttention + output "
          "dense/LayerNorm; block 64, 3 random blocks). Ours: 4 nn.Linear(512, 512) + sa.attention. "
          "Timed: forward + backward w.r.t. input and weights. 'Without the 4 Linear' subtracts the time of the "
          "four projections alone (measured in the same group) from both sides; HF's extra global projections "
          "stay on its side.")
    print()


# ----------------------------------------------------------------------------- main


def machine():
    model = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:  # noqa: BLE001
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "loadavg_start": os.getloadavg()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run the complete measurements (a-e)")
    ap.add_argument("--json", metavar="FILE", help="also write all figures and samples to FILE")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="quick run: repeats per group")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192], help="quick run: sequence lengths")
    ap.add_argument("--n", type=int, default=16384, help="full: N for sections a, b, e")
    ap.add_argument("--repeats-fwd", type=int, default=4, help="full: repeats of the forward group")
    ap.add_argument("--repeats-bwd", type=int, default=3, help="full: repeats of the fwd+bwd group")
    ap.add_argument("--repeats-hf", type=int, default=3, help="full: repeats of the HF comparison")
    ap.add_argument("--mem-lengths", type=int, nargs=2, default=[16384, 65536], help="full: memory lengths")
    ap.add_argument("--mem-dense", action="store_true", help="full: also measure dense SDPA memory at --n")
    ap.add_argument("--sections", default="abcde", help="full: which sections to run (subset of abcde)")
    ap.add_argument("--_mem-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-what", default="sa", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._mem_child:
        mem_child(args._mem_child, args._mem_what)
        return

    info = machine()
    results = {"machine": info, "argv": sys.argv, "quick": []}
    print(f"# sparse_attention benchmark ({'full' if args.full else 'quick'})")
    print(f"{info['date']}; CPU {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), python {info['python']}")
    print()
    t0 = time.perf_counter()
    if not args.full:
        quick(args, results)
    else:
        if any(s in args.sections for s in "abe"):
            full_speed(args, results)
        if "c" in args.sections:
            full_memory(args, results)
        if "d" in args.sections:
            full_hf(args, results)
    results["wall_seconds"] = time.perf_counter() - t0
    results["loadavg_end"] = os.getloadavg()
    print(f"total wall time {results['wall_seconds']:.0f} s; 1/5/15-min load average at start "
          f"{info['loadavg_start']}, at end {results['loadavg_end']} (other processes on the machine "
          "compete for its cores when the load average exceeds the core count)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
