"""``sparse-attention``: see a pattern, benchmark every mechanism, check numerics, estimate cost.

    sparse-attention list
    sparse-attention show sliding_window --seq-len 128 --window 8 -o window.png
    sparse-attention bench [--mechanisms ...] [--seq-lens 1024,2048,4096] [--backward] [--json F] [--plot F]
    sparse-attention bench --lra
    sparse-attention check bigbird --seq-len 257 --dtype bf16
    sparse-attention cost longformer --seq-len 16384 --window 256

Mechanism options are given as ``--NAME VALUE`` after the mechanism (VALUE is read as a
Python literal: ``--window 8``, ``--indices "(0, 5)"``, ``--causal True``); unknown
options are an error listing the valid ones. Errors exit with status 2.

Mechanisms of kind "module" (Performer, Linformer, Routing, ...: head-split modules with
learned or random state, see ``list``) are listed and benchmarked; ``show``, ``cost`` and
``check`` work on a pattern of attended pairs, which these do not have, and refuse them
(status 2) saying so.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys

import torch

from . import registry
from .dynamic import DynamicPattern, explain

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


class UsageError(Exception):
    """A bad command line: printed with the program name, exit status 2."""


# --- argument helpers ---------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    values = [_positive_int(t) for t in text.replace(" ", "").split(",") if t]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def _dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose one of {sorted(set(DTYPES))}")
    return DTYPES[text]


def _mechanism(name: str) -> registry.Mechanism:
    try:
        return registry.get(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _options(extra: list[str], mech: registry.Mechanism) -> dict:
    """``--name value`` pairs after the mechanism -> options dict, validated against its defaults."""
    opts = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) <= 2:
            raise UsageError(f"unexpected argument {token!r}")
        key, _, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not value:
            if i + 1 >= len(extra):
                raise UsageError(f"option --{key} needs a value")
            value = extra[i + 1]
            i += 1
        try:
            opts[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key] = value
        i += 1
    unknown = set(opts) - set(mech.defaults)
    if unknown:
        raise UsageError(f"unknown option(s) {sorted('--' + u for u in unknown)} for {mech.name!r}; "
                         f"valid: {sorted('--' + d for d in mech.defaults) or 'none'}")
    return opts


#: why each pattern command refuses a "module" mechanism
_NO_PATTERN = {
    "show": "there is no pattern of attended pairs to draw",
    "cost": "its cost is not a count of attended pairs",
    "check": "there is no dense masked reference to check it against",
}


def _pattern(args, extra: list[str], n_q: int, n_k: int):
    """The mechanism named on the command line, built with its options and checked for N, S."""
    mech = _mechanism(args.mechanism)
    if mech.kind == "module":
        raise UsageError(f"{mech.name} is a module mechanism ({mech.summary}): {_NO_PATTERN[args.command]}; "
                         f"`{args.command}` takes static and content-based mechanisms. Measure its time and "
                         f"error with `sparse-attention bench --mechanisms {mech.name}`")
    opts = _options(extra, mech)
    try:
        pattern = mech.make(**opts)
        static = getattr(pattern, "restrict", pattern)
        if static is not None:
            static.check_lengths(n_q, n_k)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{mech.name}: {e}") from None
    return pattern


def _random_qk(heads: int, n: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, n, dim, generator=g), torch.randn(1, heads, n, dim, generator=g)


def _output_path(path: str, suffixes: tuple[str, ...]) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output directory {folder!r} does not exist")
    if not path.lower().endswith(suffixes):
        raise UsageError(f"output file {path!r} must end with one of {', '.join(suffixes)}")
    return path


def _table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table when rich is installed, else plain aligned text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
        if title:
            print(title)
        for r in [headers, ["-" * w for w in widths], *rows]:
            print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)))
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        # the first column (names) is never cut; short cells (yes/no, kinds) keep their width, long ones wrap
        longest = max((len(str(r[i])) for r in rows), default=0)
        table.add_column(h, min_width=longest if i == 0 else min(longest, 12), overflow="fold")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console(width=max(120, shutil.get_terminal_size((160, 24)).columns)).print(table)


# --- commands -----------------------------------------------------------------------------


def cmd_list(args, extra) -> int:
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    rows = [[m.name, m.kind, yes(m.causal), m.causal_support, yes(m.stochastic), yes(m.learned),
             m.length_option or "-", yes(m.self_only),
             ", ".join(f"{k}={v!r}" for k, v in m.defaults.items()) or "-", m.summary]
            for m in registry.mechanisms()]
    _table(["mechanism", "kind", "causal", "causal option", "stochastic", "learned", "fixed length", "self only",
            "defaults", "what"], rows, "sparse_attention mechanisms")
    print("causal: the defaults are causal. causal option: strict = a causal configuration never lets later "
          "tokens change earlier outputs; keys = no future key is attended, but the keys chosen depend on all "
          "tokens; none = no causal configuration. learned: state trained with the model. fixed length: the "
          "option holding the longest length accepted. module: built inside a layer (sa.nn.build_attention).")
    return 0


SHOW_MAX_LEN = 8192  # show builds the whole N x N mask of pairs: 0.7-1.4 GB of memory at 8192 here, as N²


def cmd_show(args, extra) -> int:
    from .viz import pool_any, pool_factor, render_masks

    n = args.seq_len
    if n > SHOW_MAX_LEN:
        raise UsageError(f"--seq-len {n}: show builds the whole N x N mask of pairs, and its memory grows as N² "
                         f"(about 1 GB at 8192); draw at most {SHOW_MAX_LEN}, and use `cost` for the statistics at "
                         "this length")
    pattern = _pattern(args, extra, n, n)
    path = _output_path(args.output, (".png", ".svg"))
    content = isinstance(pattern, DynamicPattern)
    if content:  # the pairs kept on a random input
        q, k = _random_qk(args.heads or 1, n, args.dim, args.input_seed)
        mask = explain(q, k, pattern)[0]
        mask = mask[0] if mask.shape[0] == 1 else mask
    else:
        mask = pattern.mask(n, n)
    masks = mask if mask.dim() == 3 else mask.unsqueeze(0)
    if not content and mask.dim() == 3 and args.heads not in (None, mask.shape[0]):
        raise UsageError(f"{args.mechanism} has {mask.shape[0]} heads, got --heads {args.heads}")
    block = getattr(pattern, "block", None)  # block patterns show their block grid
    density = float(mask.float().mean())
    factor = pool_factor(n)  # a long matrix is drawn a tile of factor x factor pairs per pixel
    if factor > 1:
        masks, block = pool_any(masks, factor), None
    title = f"{pattern!r} | N=S={n}, density {density:.3f}" + (f", grid: blocks of {block}" if block else "")
    if factor > 1:
        title += f" | a pixel per {factor}x{factor} pairs, drawn when any is kept"
    if content:
        title += f" | pairs kept on random q, k (input seed {args.input_seed}, D={args.dim})"
    panel_titles = [f"head {h}" for h in range(masks.shape[0])] if masks.shape[0] > 1 else None
    render_masks(masks, path, title=title, panel_titles=panel_titles, block=block)
    drawn = f", drawn {masks.shape[1]}x{masks.shape[2]}" if factor > 1 else ""
    print(f"wrote {path} ({masks.shape[0]} panel(s), {n}x{n}{drawn}, density {density:.4f})")
    return 0


def cmd_cost(args, extra) -> int:
    n, s = args.seq_len, args.kv_len or args.seq_len
    pattern = _pattern(args, extra, n, s)
    if isinstance(pattern, DynamicPattern):
        raise UsageError(f"{args.mechanism} chooses its pairs from q and k, so its cost depends on the data; "
                         "measure it with `sparse-attention bench` or inspect the pairs with `show`")
    st = pattern.stats(n, s, num_heads=args.heads, head_dim=args.dim, batch=args.batch, dtype=args.dtype)
    gib = 2**30
    rows = [
        ["attended pairs per head", f"{st.attended_pairs:,}", f"{n * s:,}"],
        ["density", f"{st.density:.4f}", "1"],
        ["forward GFLOP (useful)", f"{st.flops_forward / 1e9:.2f}", f"{st.flops_dense / 1e9:.2f}"],
        ["pairs the engine computes per head", f"{st.computed_pairs:,} (block {st.block})", f"{n * s:,}"],
        ["peak memory fwd+bwd, GiB (estimate)", f"{st.peak_memory_bytes / gib:.3f}",
         f"{st.dense_scores_bytes / gib:.3f} (an N x S score matrix)"],
    ]
    _table(["", repr(pattern), "dense"], rows,
           f"cost at N={n}, S={s}, B={args.batch}, H={args.heads}, D={args.dim}, {args.dtype}")
    return 0


def cmd_check(args, extra) -> int:
    from .functional import attention
    from .reference import reference_attention
    from .testing import verdict

    n, s = args.seq_len, args.kv_len or args.seq_len
    pattern = _pattern(args, extra, n, s)
    device = _device(args.device)
    g = torch.Generator().manual_seed(0)
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise UsageError(f"--heads {args.heads} must be a multiple of --kv-heads {kv_heads}")
    shapes = [(args.batch, args.heads, n, args.dim), (args.batch, kv_heads, s, args.dim),
              (args.batch, kv_heads, s, args.dim)]
    q64, k64, v64 = (torch.randn(*sh, generator=g, dtype=torch.float64).requires_grad_() for sh in shapes)
    upstream = torch.randn(args.batch, args.heads, n, args.dim, generator=g, dtype=torch.float64)
    if isinstance(pattern, DynamicPattern):
        def ref(a, b, c, upcast=True):
            return pattern.reference(a, b, c, upcast=upcast)
    else:
        mask = pattern.mask(n, s)

        def ref(a, b, c, upcast=True):
            return reference_attention(a, b, c, mask, upcast=upcast)

    def grads(fn, tensors, gout):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*tensors)
        return [out.detach(), *torch.autograd.grad(out, tensors, gout)]

    low = [t.detach().to(args.dtype) for t in (q64, k64, v64)]
    # golden: float64 on the inputs as rounded to the dtype (content-based selections must agree)
    golden = grads(ref, [t.double() for t in low], upstream)
    baseline = grads(lambda a, b, c: ref(a, b, c, upcast=False), low, upstream.to(args.dtype))
    from .engine import BACKENDS

    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    if isinstance(pattern, DynamicPattern):
        if args.backend not in ("all", "auto"):
            raise UsageError(f"--backend {args.backend}: content-based mechanisms run their own selection and "
                             "attention (backend auto)")
        backends = ["auto"]  # content-based mechanisms run their own path
    ok = True
    for backend in backends:
        try:
            impl = grads(lambda a, b, c, backend=backend: attention(a, b, c, pattern, backend=backend),
                         [t.to(device) for t in low], upstream.to(device, args.dtype))
        except ValueError as e:
            if args.backend == "all":
                print(f"backend {backend}: skipped ({e})")
                continue
            raise UsageError(str(e)) from None
        verdicts = [verdict(name, x.cpu(), b, gd, grad=name != "out", min_len=min(n, s))
                    for name, x, b, gd in zip(("out", "dq", "dk", "dv"), impl, baseline, golden, strict=True)]
        rows = [[v.name, f"{v.error:.3e}", f"{v.baseline:.3e}", f"{v.tolerance:.3e}",
                 "ok" if v.ok else ("NON-FINITE" if v.nonfinite else "FAIL")] for v in verdicts]
        _table(["tensor", "max|impl-fp64|", "max|naive-fp64| (same dtype)", "tolerance", "verdict"], rows,
               f"{pattern!r} on {device}, {args.dtype}, B={args.batch} H={args.heads}/{kv_heads} N={n} S={s} "
               f"D={args.dim}, backend={backend}")
        ok = ok and all(v.ok for v in verdicts)
    print("PASS" if ok else "FAIL: an error exceeds its tolerance (rule: sparse_attention.testing)")
    return 0 if ok else 1


def _device(name: str) -> torch.device:
    """The --device value as a device this torch build can use, else a usage error."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # an unknown name; a device this build or machine lacks
        raise UsageError(f"--device {name!r} cannot be used here: {str(e).splitlines()[0]}") from None
    return device


def cmd_bench(args, extra) -> int:
    from . import bench

    if extra:
        raise UsageError(f"unexpected arguments {extra}; mechanism options are not taken by bench")
    _device(args.device)
    names = args.mechanisms or [m.name for m in registry.mechanisms()]
    for name in names:
        _mechanism(name)
    if len(set(names)) != len(names):
        raise UsageError(f"--mechanisms names one mechanism twice: {names}")
    if args.lra and args.seq_lens is not None:
        raise UsageError("--lra fixes the lengths (1K-4K); drop --seq-lens")
    lengths = [1024, 2048, 3072, 4096] if args.lra else (args.seq_lens or [1024, 2048, 4096])
    backward = args.backward or args.lra
    for path, suffixes in ((args.json, (".json",)), (args.plot, (".png", ".svg"))):
        if path:
            _output_path(path, suffixes)
    kept = False
    if args.keep_freed_memory:
        from . import allocator

        kept = allocator.keep_freed_memory()
        print("keep_freed_memory: " + ("on (glibc malloc keeps freed memory)" if kept
                                       else "not available (the C library is not glibc); nothing changed"))
    from . import native

    native_status = native.status()
    print(f"native kernels: {native_status}")
    total = len(lengths) * (len(names) + 1)
    progress, close = _progress(total)
    try:
        rows = bench.run(names, lengths, heads=args.heads, dim=args.dim, batch=args.batch, dtype=args.dtype,
                         device=args.device, backward=backward, repeats=args.repeats, progress=progress)
    finally:
        close()
    if args.lra:
        _lra_table(rows)
    else:
        _bench_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {"mechanisms": names, "seq_lens": lengths, "heads": args.heads, "dim": args.dim,
                                  "batch": args.batch, "dtype": str(args.dtype), "device": args.device,
                                  "mode": "fwd+bwd" if backward else "fwd", "repeats": args.repeats,
                                  "keep_freed_memory": kept, "native": native_status, "torch": torch.__version__},
                       "rows": [r.as_dict() for r in rows]}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        _bench_plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        def step(label):
            print(f"  done: {label}", file=sys.stderr, flush=True)
        return step, lambda: None
    bar = tqdm(total=total, file=sys.stderr, desc="bench", leave=False)

    def step(label):
        bar.set_postfix_str(label)
        bar.update(1)
    return step, bar.close


def _bench_table(rows, args) -> None:
    from .bench import fmt

    body = [[r.mechanism, r.seq_len, r.status, fmt(r.time_ms), fmt(r.speedup_vs_dense, ".2f"),
             fmt(r.peak_memory_mb), fmt(r.memory_vs_dense, ".2f"), fmt(r.density, ".3f"),
             fmt(r.max_rel_error, ".2e"), fmt(r.mean_rel_error, ".2e")] for r in rows]
    _table(["mechanism", "N", "status", "ms (median)", "speed vs dense", "peak MB", "memory vs dense", "density",
            "max rel err", "mean rel err"], body,
           f"{rows[0].mode if rows else ''}, B={args.batch} H={args.heads} D={args.dim} {args.dtype} on "
           f"{args.device}; errors against full attention on the same inputs")


def _lra_table(rows) -> None:
    """The layout of the Long Range Arena efficiency table: steps/s and memory relative to dense."""
    from .bench import fmt

    lengths = sorted({r.seq_len for r in rows})
    by = {(r.mechanism, r.seq_len): r for r in rows}
    names = list(dict.fromkeys(r.mechanism for r in rows))
    body = []
    for name in names:
        speed = []
        mem = []
        for n in lengths:
            r, d = by[(name, n)], by[("dense SDPA", n)]
            ok = r.status == "ok" and d.status == "ok"
            speed.append(fmt(d.time_ms / r.time_ms, ".2f") + "x" if ok else r.status)
            mem.append(fmt(r.peak_memory_mb / d.peak_memory_mb, ".2f") + "x"
                       if ok and r.peak_memory_mb and d.peak_memory_mb else "-")
        body.append([name, *speed, *mem])
    heads = [f"{n // 1024 if n % 1024 == 0 else n / 1024:g}K" for n in lengths]
    _table(["model", *[f"steps/s {h}" for h in heads], *[f"memory {h}" for h in heads]], body,
           "Long Range Arena efficiency layout (training step = fwd+bwd of one attention layer), "
           "relative to dense SDPA; dense row = 1")
    dense = [by[("dense SDPA", n)] for n in lengths]
    print("dense SDPA absolute: " + ", ".join(
        f"{n}: {1e3 / d.time_ms:.2f} steps/s, {fmt(d.peak_memory_mb)} MB" if d.status == "ok" else f"{n}: {d.status}"
        for n, d in zip(lengths, dense, strict=True)))


def _bench_plot(rows, path) -> None:
    from .viz import require_matplotlib

    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r.mechanism for r in rows):
        pts = [r for r in rows if r.mechanism == name and r.status == "ok"]
        if not pts:
            continue
        dense = name == "dense SDPA"
        style = dict(marker="o", lw=2.5 if dense else 1.2, color="black" if dense else None)
        axes[0].plot([r.seq_len for r in pts], [r.time_ms for r in pts], label=name, **style)
        mem = [r for r in pts if r.peak_memory_mb]
        if mem:
            axes[1].plot([r.seq_len for r in mem], [r.peak_memory_mb for r in mem], label=name, **style)
    for ax, what in zip(axes, ("time (ms, median)", "peak memory above inputs (MB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"sparse_attention bench ({rows[0].mode if rows else ''})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- parser -------------------------------------------------------------------------------


def _add_common(p) -> None:
    p.add_argument("--heads", type=_positive_int, default=8, help="query heads H (default 8)")
    p.add_argument("--dim", type=_positive_int, default=64, help="head dim D (default 64)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch B (default 1)")
    p.add_argument("--dtype", type=_dtype, default=torch.float32, help="fp32 (default), bf16, fp16, fp64")


def parser() -> argparse.ArgumentParser:
    # no abbreviations: a mechanism option (TopK's --k) must never be read as a prefix of a tool option
    # (--kv-len, --kv-heads)
    ap = argparse.ArgumentParser(prog="sparse-attention", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every mechanism with its capabilities and default options", allow_abbrev=False)

    p = sub.add_parser("show", help="draw a pattern (PNG or SVG)", allow_abbrev=False)
    p.add_argument("mechanism")
    p.add_argument("--seq-len", type=_positive_int, default=64, help="N = S (default 64)")
    p.add_argument("--heads", type=_positive_int, default=None,
                   help="per-head patterns: expected heads; content-based: heads of the random input (default 1)")
    p.add_argument("--dim", type=_positive_int, default=64, help="content-based: head dim of the random input")
    p.add_argument("--input-seed", type=int, default=0,
                   help="content-based: seed of the random input (--seed is the mechanism's own option)")
    p.add_argument("-o", "--output", required=True, help="FILE.png or FILE.svg")

    p = sub.add_parser("cost", help="pairs, FLOPs and memory before running", allow_abbrev=False)
    p.add_argument("mechanism")
    p.add_argument("--seq-len", type=_positive_int, required=True, help="N")
    p.add_argument("--kv-len", type=_positive_int, default=None, help="S (default N)")
    _add_common(p)

    p = sub.add_parser("check", help="forward and gradients against the fp64 reference on this machine",
                       allow_abbrev=False)
    p.add_argument("mechanism")
    p.add_argument("--seq-len", type=_positive_int, default=257, help="N (default 257)")
    p.add_argument("--kv-len", type=_positive_int, default=None, help="S (default N)")
    p.add_argument("--kv-heads", type=_positive_int, default=None, help="Hkv (default H)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="all", help="auto, dense, blocksparse, or all (default)")
    _add_common(p)
    p.set_defaults(heads=4, dim=32, batch=2)

    p = sub.add_parser("bench", help="time, memory and error of every mechanism vs dense SDPA", allow_abbrev=False)
    p.add_argument("--mechanisms", nargs="+", default=None, help="names (default: all)")
    p.add_argument("--seq-lens", type=_int_list, default=None, help="comma separated (default 1024,2048,4096)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs after one warm-up (median)")
    p.add_argument("--lra", action="store_true", help="Long Range Arena layout: fwd+bwd at 1K-4K")
    p.add_argument("--json", default=None, help="write every figure to FILE.json")
    p.add_argument("--plot", default=None, help="log-log plot of time and memory vs length (FILE.png)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="call sa.keep_freed_memory() first (glibc: no page faults for tensors freed and "
                        "allocated again; helps from N ~ 16384 on)")
    _add_common(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    if extra and args.command in ("list",):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"list": cmd_list, "show": cmd_show, "cost": cmd_cost, "check": cmd_check, "bench": cmd_bench}
    try:
        return commands[args.command](args, extra)
    except UsageError as e:
        print(f"sparse-attention {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"sparse-attention {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
