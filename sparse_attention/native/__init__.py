"""Native (C) kernels for the steps PyTorch has no fast operator for, compiled on first use.

- ``topk.c``: the row-wise top-k that TopK and Routing select with: two vectorised passes over each
  row instead of ``torch.topk``'s per-element heap or quickselect;
- ``lsh.c``: LSH's bucket of each row of projections (argmax over [xR, -xR]) and the stable order of
  tokens by bucket (a counting sort instead of ``torch.sort``; also routing's member lists);
- ``mix.c``: TopK's products over its selected pairs: the value mixing and dQ (weighted sums of
  gathered rows), dW (dot products with gathered rows) and dV, dK (scatter-adds, in parallel over
  groups of rows that share no output row), instead of CSR products;
- ``routing.c``: routing's pair counts (the clusters two tokens share) by popcounts of bit sets,
  instead of one-hot rows and their matrix product;
- ``linear.c``: linear attention's cores (non-causal and causal, forward and backward) for the
  elementwise feature maps (elu+1, relu, or features computed beforehand) and FAVOR+: one pass over the
  rows per step instead of a dozen PyTorch passes.

The sources are compiled once per machine with the C compiler found (``$CC``, else ``cc``/``gcc``/
``clang``), ``-O3 -march=native -fopenmp`` (then without either flag where that fails), into
``$SPARSE_ATTENTION_CACHE`` (default ``~/.cache/sparse_attention``), keyed by the sources, the
compiler command and the CPU's flags, and loaded with ctypes. Built with OpenMP, the kernels run on
PyTorch's own OpenMP threads (see rows.h). Where there is no compiler, or it fails, or
``SPARSE_ATTENTION_NATIVE=0``, the callers use their PyTorch path: the same results, slower.
``status()`` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["available", "bucket_order", "dot_rows", "empty", "items_backward", "items_forward", "linear_backward",
           "linear_forward", "linear_map", "lsh_buckets", "mix_rows", "pair_counts", "scatter_groups", "status",
           "topk_rows", "unit_rows_backward"]

_DIR = Path(__file__).parent
_SOURCES = ["topk.c", "lsh.c", "mix.c", "routing.c", "linear.c", "items.c"]
_HEADERS = ["rows.h", "vec.h"]
_FLAGS = ["-O3", "-shared", "-fPIC"]
# Tried in order. With OpenMP the kernels run on PyTorch's own OpenMP threads (see rows.h), without it
# on the calling thread; -march=native lets the compiler use every vector instruction of this CPU.
_ATTEMPTS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # None: not tried yet


#: torch.compile must not trace into the calls that hand raw pointers to C: a graph break inside one of them
#: let Dynamo free a tensor whose address was already taken (a segfault under backend="eager", found by an
#: audit); these run eagerly, whole, as a graph break of their own
_eager = torch.compiler.disable


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cache_dir() -> Path:
    root = os.environ.get("SPARSE_ATTENTION_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparse_attention"


_SIGNATURES = {  # every exported kernel: argument types (all return an int status)
    "sa_topk_f32": "p i i i i p p t",
    "sa_lsh_buckets_f32": "p i i i p t",
    "sa_bucket_order": "p i i i p t",
    "sa_mix_rows_f32": "p p i i p i p t",
    "sa_dot_rows_f32": "p p i i p i p t",
    "sa_scatter_groups_f32": "p p i i i i p i p t",
    "sa_unit_rows_bwd_f32": "p p p i i d p t",
    "sa_member_bits": "p i i i i p t",
    "sa_pair_counts": "p p i i i i p p i i p p t",
    "sa_linear_fwd_f32": "p p p p p p i i i i i i i d p p p t",
    "sa_linear_bwd_f32": "p p p p p p p p p p i i i i i i i p p p t",
    "sa_linear_causal_fwd_f32": "p p p p p p i i i i i i i d p p t",
    "sa_linear_causal_bwd_f32": "p p p p p p p p p i i i i i i i p p p t",
    "sa_items_bwd_f32": "p p p p p p p p p p p p i i i i i i i i i i d p p p p p t",
    "sa_items_fwd_f32": "p p p p p p p p p i i i i i i i i i i d p p p t",
    "sa_linear_vector_bytes": "",
    "sa_openmp": "",
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "t": ctypes.c_int, "d": ctypes.c_double}


def _compile(cc: list[str], target: Path) -> str | None:
    """Builds the library into target (atomically), trying _ATTEMPTS in order; None, or why it failed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"no cache directory {target.parent}: {e}"
    errors = []
    for extra in _ATTEMPTS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = cc + _FLAGS + extra + ["-o", tmp] + [str(_DIR / name) for name in _SOURCES]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            error = None if done.returncode == 0 else f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()}"
        except (OSError, subprocess.TimeoutExpired) as e:
            error = f"`{' '.join(cmd)}` could not run: {e}"
        if error is None:
            os.replace(tmp, target)  # atomic: a process building the same file at once reads a whole one
            return None
        os.unlink(tmp)
        errors.append(error)
    return "\n".join(errors)


def _open(target: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(target))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, [_CTYPES[a] for a in args.split()]
    return lib


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("SPARSE_ATTENTION_NATIVE", "1") == "0":
        return None, "disabled by SPARSE_ATTENTION_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    texts = [(_DIR / name).read_bytes() for name in _SOURCES + _HEADERS]
    command = " ".join(cc + _FLAGS + [" ".join(a) for a in _ATTEMPTS])
    key = hashlib.sha256(b"\0".join(texts + [command.encode(), platform.machine().encode(),
                                             _cpu_flags().encode()])).hexdigest()[:16]
    name = f"sa_native-{key}.so"
    target = _cache_dir() / name
    fresh = not target.exists()
    while True:
        if fresh:
            error = _compile(cc, target)
            if error is not None and error.startswith("no cache directory"):  # build for this process only
                target = Path(tempfile.mkdtemp(prefix="sparse_attention-")) / name
                error = _compile(cc, target)
            if error is not None:
                return None, error
        try:
            lib = _open(target)
            break
        except (OSError, AttributeError) as e:
            if fresh:
                return None, f"{target} could not be loaded: {e}"
            target.unlink(missing_ok=True)  # a damaged cached build: build it again, once
            fresh = True
    threads = "PyTorch's OpenMP threads" if lib.sa_openmp() else "one thread (built without OpenMP)"
    return lib, f"compiled kernels loaded from {target}, running on {threads}"


def _load() -> ctypes.CDLL | None:
    global _lib, _reason
    if _reason is None:
        with _lock:
            if _reason is None:
                _lib, _reason = _build()
                if _lib is None and _compiler() is not None and "SPARSE_ATTENTION_NATIVE" not in _reason:
                    warnings.warn(f"sparse_attention: native kernels unavailable, using the PyTorch path "
                                  f"(slower): {_reason}", RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    """Whether the native kernels are compiled and loaded (builds them on the first call)."""
    return _load() is not None


def items_available() -> bool:
    """Whether the items kernels (``items_forward`` / ``items_backward``) run here: loaded, with vectors of
    32 bytes or more (an SSE-only build is slower than PyTorch's fused kernel, see ``items_backward``)."""
    lib = _load()
    return lib is not None and lib.sa_linear_vector_bytes() >= 32


def status() -> str:
    """Why the native kernels are (or are not) in use."""
    _load()
    return _reason or ""


def _rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[ctypes.CDLL, torch.Tensor] | None:
    """The library and x as (rows, last) with unit column stride, when the kernels take x: a CPU tensor
    of ``dtype`` that autograd does not track (they return plain results)."""
    if x.device.type != "cpu" or x.dtype != dtype or (x.requires_grad and torch.is_grad_enabled()):
        return None
    lib = _load()
    if lib is None:
        return None
    flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    return lib, flat if flat.stride(-1) == 1 else flat.contiguous()


_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise_fn: object = None  # None: not looked up yet; False: no advice to give here


def _madvise():
    """libc's madvise when this kernel gives transparent huge pages to memory that asks for them (Linux,
    /sys/kernel/mm/transparent_hugepage/enabled in mode "madvise"), else None: in mode "always" they come
    without asking, in "never" not at all. ``SPARSE_ATTENTION_HUGE_PAGES=0`` (read once) asks for none."""
    global _madvise_fn
    if _madvise_fn is None:
        _madvise_fn = False
        if os.environ.get("SPARSE_ATTENTION_HUGE_PAGES") != "0":
            try:
                with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                    mode = f.read()
                if "[madvise]" in mode:
                    fn = ctypes.CDLL(None, use_errno=True).madvise
                    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
                    _madvise_fn = fn
            except (OSError, AttributeError):  # not Linux, or a libc without madvise
                pass
    return _madvise_fn or None


def empty(*shape: int) -> torch.Tensor:
    """An uninitialised float32 CPU tensor for a kernel or an ``out=`` operation to fill whole.

    The whole 2 MiB pages of one of 4 MiB or more are advised to be transparent huge pages before anything
    touches them. glibc maps a tensor of 32 MiB or more afresh on every call, and faulting one in 4 kB at a
    time took ~8 ms here, against ~3 ms in 2 MiB pages (benchmarks/RESULTS.md). The advice is only that:
    where the kernel does not take it, nothing changes."""
    t = torch.empty(*shape, dtype=torch.float32)
    start, nbytes = t.data_ptr(), t.numel() * 4
    if nbytes >= 2 * _HUGE_PAGE and (advise := _madvise()) is not None:
        lo = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        hi = (start + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo:
            advise(lo, hi - lo, _MADV_HUGEPAGE)
    return t


def _threads(rows: int) -> int:
    return max(1, min(torch.get_num_threads(), rows))


@_eager
def topk_rows(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The native top-k of each row of a CPU float32 tensor s (..., S), 0 < k <= S: (values, columns)
    (..., k), each row in ascending column order. Entries rank by value, NaN above every number,
    equal values by lower column; the first k in that order are kept. None when the kernels are not
    available or s does not qualify (other dtype or device, or autograd would need to track values).
    """
    S = s.shape[-1]
    found = _rows(s, torch.float32) if 0 < k <= S else None
    if found is None:
        return None
    lib, flat = found
    rows = flat.shape[0]
    values = torch.empty(rows, k, dtype=torch.float32)
    cols = torch.empty(rows, k, dtype=torch.long)
    if rows:
        row_stride = flat.stride(0) if rows > 1 else S
        if lib.sa_topk_f32(flat.data_ptr(), rows, S, row_stride, k, values.data_ptr(), cols.data_ptr(),
                           _threads(rows)):
            raise MemoryError(f"native top-k: no memory for the scratch of its threads, S={S}, k={k}")
    return values.view(*s.shape[:-1], k), cols.view(*s.shape[:-1], k)


@_eager
def lsh_buckets(p: torch.Tensor) -> torch.Tensor | None:
    """LSH buckets of projections p (..., half) float32 on CPU: argmax over [p, -p] along the last
    dimension, i.e. the column of the largest |p| (the first on ties) plus half when that entry is
    negative; a row holding NaN gives its first NaN's column (as torch.argmax). (...,) int64, or None
    when the kernels are not available or p does not qualify."""
    found = _rows(p, torch.float32) if p.shape[-1] > 0 else None
    if found is None:
        return None
    lib, flat = found
    rows = flat.shape[0]
    out = torch.empty(rows, dtype=torch.long)
    if rows:
        lib.sa_lsh_buckets_f32(flat.data_ptr(), rows, flat.shape[1], flat.stride(0) if rows > 1 else flat.shape[1],
                               out.data_ptr(), _threads(rows))
    return out.view(p.shape[:-1])


@_eager
def bucket_order(b: torch.Tensor, values: int) -> torch.Tensor | None:
    """The stable sort order of each row of bucket ids b (..., L) int64 on CPU, all in [0, values):
    positions by ascending bucket, equal buckets by position (``torch.sort(b * L + arange(L)).indices``),
    by a counting sort. None when the kernels are not available or b does not qualify."""
    found = _rows(b, torch.long)
    if found is None:
        return None
    lib, flat = found
    flat = flat.contiguous()
    rows, L = flat.shape
    order = torch.empty(rows, L, dtype=torch.long)
    if rows and L:
        status = lib.sa_bucket_order(flat.data_ptr(), rows, L, values, order.data_ptr(), _threads(rows))
        if status == -2:
            raise ValueError(f"bucket ids must lie in [0, {values}), got min {int(b.min())}, max {int(b.max())}")
        if status:
            raise MemoryError("native bucket order: no memory for the counts")
    return order.view(b.shape)


def _args(ints: tuple[torch.Tensor, ...], floats: tuple[torch.Tensor | None, ...] = ()):
    """The library and contiguous copies (when needed) of int64 ``ints`` and float32 ``floats`` (an optional
    float may be None, and stays None), when the kernels take them (CPU tensors autograd does not track);
    else None."""
    lib = _load()
    given = [x for x in floats if x is not None]
    tensors = (*ints, *given)
    if lib is None or any(x.dtype != torch.long for x in ints) or any(x.dtype != torch.float32 for x in given) or \
            any(x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) for x in tensors):
        return None
    return lib, [x if x is None else x.contiguous() for x in (*ints, *floats)]


@_eager
def mix_rows(w: torch.Tensor, cols: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Weighted sums of gathered rows: out[..., r, :] = sum_j w[..., r, j] * v[cols[..., r, j], :] for CPU
    float32 w (..., k) and v (R, E), int64 cols (..., k) in [0, R) (not checked: the caller's own
    indices). Every slot is summed, zero weights included. (..., E), or None when the kernels are not
    available or the inputs do not qualify."""
    found = _args((cols,), (w, v))
    if found is None:
        return None
    lib, (cols_c, w_c, v) = found
    k = w.shape[-1]
    rows = w_c.numel() // k if k else math.prod(w.shape[:-1])
    out = torch.empty(rows, v.shape[1], dtype=torch.float32)
    if rows:
        lib.sa_mix_rows_f32(w_c.data_ptr(), cols_c.data_ptr(), rows, k, v.data_ptr(), v.shape[1], out.data_ptr(),
                            _threads(rows))
    return out.view(*w.shape[:-1], v.shape[1])


@_eager
def unit_rows_backward(y: torch.Tensor, g: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The gradient of y = x / max(|x|, eps) per row, for float32 y, g (..., E) and norm = |x| (..., 1):
    (g - y (y·g)) / max(norm, eps), with y·g taken as 0 where norm <= eps (those rows are divided by the
    constant eps); None when the kernels do not take them."""
    found = _args((), (y, g, norm))
    if found is None:
        return None
    lib, (y, g, norm) = found
    E = y.shape[-1]
    rows = y.numel() // E if E else 0
    dx = torch.empty(y.shape, dtype=torch.float32)
    if rows:
        lib.sa_unit_rows_bwd_f32(y.data_ptr(), g.data_ptr(), norm.data_ptr(), rows, E, eps, dx.data_ptr(),
                                 _threads(rows))
    return dx


@_eager
def dot_rows(a: torch.Tensor, cols: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """out[r, j] = a[r] . b[cols[r, j]] for float32 a (R, E), b (R', E) and int64 cols (R, k) in
    [0, R') (not checked: the caller's own indices): (R, k), or None when not available."""
    found = _args((cols,), (a, b))
    if found is None:
        return None
    lib, (cols, a, b) = found
    rows, k = cols.shape
    out = torch.empty(rows, k, dtype=torch.float32)
    if rows and k:
        lib.sa_dot_rows_f32(a.data_ptr(), cols.data_ptr(), rows, k, b.data_ptr(), a.shape[1], out.data_ptr(),
                            _threads(rows))
    return out


@_eager
def scatter_groups(w: torch.Tensor, cols: torch.Tensor, src: torch.Tensor, groups: int, keys_per_group: int) -> \
        torch.Tensor | None:
    """out[cols[r, j]] += w[r, j] * src[r] over every pair, for float32 w (R, k), src (R, E) and int64 cols
    (R, k) (a negative column skips its pair): (groups · keys_per_group, E). The R rows form ``groups``
    equal groups whose columns all lie in the group's own keys_per_group output rows (not checked: the
    caller's own indices); the groups run in parallel. None when not available."""
    found = _args((cols,), (w, src))
    if found is None:
        return None
    lib, (cols, w, src) = found
    rows, k = cols.shape
    out = torch.empty(groups * keys_per_group, src.shape[1], dtype=torch.float32)
    if groups:
        lib.sa_scatter_groups_f32(w.data_ptr(), cols.data_ptr(), groups, rows // groups, keys_per_group, k,
                                  src.data_ptr(), src.shape[1], out.data_ptr(), _threads(groups))
    return out


@_eager
def pair_counts(qi: torch.Tensor, ki: torch.Tensor, N: int, S: int, *, neg_log: bool = False) -> torch.Tensor | None:
    """Routing's pair counts: for cluster members qi (B, H, K, wq) in [0, N) and ki (B, H, K, wk) in
    [0, S) (int64, CPU; each cluster's members distinct), in how many clusters each (query slot, key
    slot) pair of every cluster meets, (B, H, K, wq, wk) float32; with ``neg_log``, -log of the count
    (looked up per count as it is written: no pass over the counts). None when not available."""
    found = _args((qi, ki))
    if found is None:
        return None
    lib, (qi, ki) = found
    B, H, K, wq = qi.shape
    wk = ki.shape[-1]
    words = (K + 63) // 64
    sets = []
    for idx, L in ((qi, N), (ki, S)):
        bits = torch.empty(B * H, L, words, dtype=torch.int64)  # uint64 bit sets, stored as int64
        if B * H and lib.sa_member_bits(idx.data_ptr(), B * H, K, idx.shape[-1], L, bits.data_ptr(),
                                        _threads(B * H)):
            raise ValueError(f"cluster members must lie in [0, {L}), got min {int(idx.min())}, max {int(idx.max())}")
        sets.append(bits)
    out = torch.empty(B, H, K, wq, wk, dtype=torch.float32)
    table = torch.arange(K + 1, dtype=torch.float64).clamp_(min=1).log_().neg_().float() if neg_log else None
    if out.numel():
        if lib.sa_pair_counts(qi.data_ptr(), ki.data_ptr(), B * H, K, wq, wk, sets[0].data_ptr(),
                              sets[1].data_ptr(), N, S, 0 if table is None else table.data_ptr(), out.data_ptr(),
                              _threads(B * H * K)):
            raise MemoryError(f"native pair counts: no memory for a cluster's key sets, wk={wk}, K={K}")
    return out


def _item_rows(qrows: torch.Tensor, krows: torch.Tensor, Nq: int, Nk: int, Nk2: int = 0) -> \
        tuple[torch.Tensor, torch.Tensor]:
    """Each group's item rows (G, I, w) -> rows of the flattened (G·N, ·) tensors (-1 stays -1), contiguous;
    a key row r >= Nk of group gi is row r - Nk of that group in the second source, which the kernels find
    at G·Nk + gi·Nk2 + r - Nk."""
    G = qrows.shape[0]
    group = torch.arange(G).view(G, 1, 1)
    qrows = torch.where(qrows >= 0, qrows + group * Nq, -1)
    first = krows + group * Nk
    if Nk2:
        first = torch.where(krows < Nk, first, krows - Nk + G * Nk + group * Nk2)
    return qrows.contiguous(), torch.where(krows >= 0, first, -1).contiguous()


def _items_shapes(q, k, v, k2, v2, qrows, krows, g=None, o=None, lse=None) -> int:
    """Checks the items kernels' tensors against each other (the kernels index them by these sizes, so a
    mismatch would read or write past their ends): q (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv), optionally k2
    (G, Nk2, D) and v2 (G, Nk2, Dv), qrows (G, I, wq), krows (G, I, wk), and for the backward g and o
    (G, Nq, Dv) and lse (G, Nq). Returns Nk2 (0 without a second source)."""
    if (k2 is None) != (v2 is None):
        raise ValueError("k2 and v2 go together: give both or neither")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or qrows.dim() != 3 or krows.dim() != 3:
        raise ValueError(f"q, k, v, qrows, krows must be 3-D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(qrows.shape)}, {tuple(krows.shape)}")
    (G, Nq, D), (Nk, Dv) = q.shape, (k.shape[1], v.shape[2])
    want = {"k": (G, Nk, D), "v": (G, Nk, Dv), "qrows": (G, *qrows.shape[1:]),
            "krows": (G, qrows.shape[1], krows.shape[2])}  # krows: as many items as qrows
    given = {"k": k, "v": v, "qrows": qrows, "krows": krows}
    if k2 is not None:
        want.update(k2=(G, k2.shape[1], D), v2=(G, k2.shape[1], Dv))
        given.update(k2=k2, v2=v2)
    if g is not None:
        want.update(g=(G, Nq, Dv), o=(G, Nq, Dv), lse=(G, Nq))
        given.update(g=g, o=o, lse=lse)
    for name, shape in want.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must be {shape} for q {tuple(q.shape)}, k {tuple(k.shape)} and v "
                             f"{tuple(v.shape)}, got {tuple(given[name].shape)}")
    return 0 if k2 is None else k2.shape[1]


def _item_bias(bias: torch.Tensor | None, items: int, wq: int, wk: int) -> \
        tuple[torch.Tensor | None, torch.Tensor | None, int] | None:
    """A bias (..., wq or 1, wk) whose leading dimensions run over the items in order (``items`` in all), any
    strides (expanded, permuted: not copied), as the kernels read it: the tensor (its last dimension
    contiguous), each item's first entry (items,) and the row stride (0 for one row shared by the item's
    queries); None when it does not qualify."""
    if bias is None:
        return None, None, 0
    if bias.shape[-2] not in (1, wq) or bias.shape[-1] != wk or math.prod(bias.shape[:-2]) != items:
        raise ValueError(f"bias must be (..., {wq} or 1, {wk}) over {items} items, got {tuple(bias.shape)}")
    if bias.dtype != torch.float32 or bias.device.type != "cpu" or (bias.requires_grad and torch.is_grad_enabled()):
        return None
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    lead = bias.shape[:-2]
    boff = torch.zeros(lead, dtype=torch.long)
    for d, (n, stride) in enumerate(zip(lead, bias.stride(), strict=False)):
        boff = boff + (torch.arange(n) * stride).view(*[1] * d, n, *[1] * (len(lead) - d - 1))
    return bias, boff.reshape(-1).contiguous(), 0 if bias.shape[-2] == 1 else bias.stride(-2)


@_eager
def items_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qrows: torch.Tensor, krows: torch.Tensor,
                  bias: torch.Tensor | None, scale: float, k2: torch.Tensor | None = None,
                  v2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Softmax attention over items whose rows are given by index, each query's items merged: (out, lse).

    q (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv); qrows (G, I, wq), krows (G, I, wk), bias and the optional
    second source k2, v2 as for :func:`items_backward`. A query's softmax runs over every (item, key) pair
    it is in, with p = exp(scale·q·k + bias); out (G, Nq, Dv) is its normalised output and lse (G, Nq) its
    log-sum-exp (a query in no item, or with no allowed key: out 0, lse -inf). The kernel returns the largest
    of the query's row maxima M and Z = Σ exp(m - M)·l; lse = M + log Z. float32 on CPU with vectors of 32
    bytes or more, else None."""
    Nk2 = _items_shapes(q, k, v, k2, v2, qrows, krows)
    G, I, wq = qrows.shape
    wk = krows.shape[2]
    found, item_bias = _args((qrows, krows), (q, k, v, k2, v2)), _item_bias(bias, G * I, wq, wk)
    if found is None or item_bias is None or not items_available():
        return None
    (lib, (qrows, krows, q, k, v, k2, v2)), (bias, boff, brow) = found, item_bias
    Nq, D = q.shape[1:]
    Nk, Dv = k.shape[1], v.shape[2]
    qrows, krows = _item_rows(qrows, krows, Nq, Nk, Nk2)
    out, M, Z = empty(G, Nq, Dv), q.new_empty(G, Nq), q.new_empty(G, Nq)
    if G and lib.sa_items_fwd_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(k2), _ptr(v2), qrows.data_ptr(),
                                  krows.data_ptr(), _ptr(bias), _ptr(boff), brow, G, I, wq, wk, D, Dv, Nq, Nk, Nk2,
                                  scale, out.data_ptr(), M.data_ptr(), Z.data_ptr(), _threads(G)):
        raise MemoryError("native items forward: no memory for a thread's scratch")
    return out, torch.where(Z > 0, M + torch.log(Z), float("-inf"))


@_eager
def items_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, qrows: torch.Tensor, krows: torch.Tensor, bias: torch.Tensor | None,
                   scale: float, k2: torch.Tensor | None = None, v2: torch.Tensor | None = None) -> \
        tuple[torch.Tensor, ...] | None:
    """The gradients (dq, dk, dv) of softmax attention over items whose rows are given by index, from the
    output gradient g, the output o and the log-sum-exp lse of every query row.

    q (G, Nq, D), g and o (G, Nq, Dv), lse (G, Nq) (+inf for a row with no key); k (G, Nk, D), v (G, Nk, Dv);
    qrows (G, I, wq) and krows (G, I, wk): each of group gi's I items' rows, in [0, Nq) and [0, Nk), or -1
    for an empty slot (not checked: the caller's own indices); with a second source of keys and values
    k2 (G, Nk2, D), v2 (G, Nk2, Dv), a key row r in [Nk, Nk + Nk2) is row r - Nk of k2 and v2 (the
    gradients are then (dq, dk, dv, dk2, dv2)); bias additive (-inf: not attended, and at
    every empty key slot), (G, I, wq or 1, wk) or any (..., wq or 1, wk) whose leading dimensions run over
    the G·I items in order, with any strides (an expanded or permuted view is read in place; one row is
    shared by the item's queries), or None. Item (gi, i)
    pairs its queries with its keys with p = exp(scale·q·k + bias - lse); rows in several items add up.
    float32 on CPU, when the build has vectors of 32 bytes or more (routing fwd+bwd at N=4096, H=8, ad hoc:
    with an SSE-only build 114.9 against 76.6 ms for the fused kernel; with AVX2 67.9 against 72.5); else
    None (see native/items.c)."""
    Nk2 = _items_shapes(q, k, v, k2, v2, qrows, krows, g, o, lse)
    G, I, wq = qrows.shape
    wk = krows.shape[2]
    found, item_bias = _args((qrows, krows), (q, k, v, k2, v2, g, o, lse)), _item_bias(bias, G * I, wq, wk)
    if found is None or item_bias is None or not items_available():
        return None
    (lib, (qrows, krows, q, k, v, k2, v2, g, o, lse)), (bias, boff, brow) = found, item_bias
    Nq, D = q.shape[1:]
    Nk, Dv = k.shape[1], v.shape[2]
    grads = [empty(*x.shape) for x in (q, k, v, k2, v2) if x is not None]
    dk2, dv2 = grads[3:] if k2 is not None else (None, None)
    qrows, krows = _item_rows(qrows, krows, Nq, Nk, Nk2)
    if G and lib.sa_items_bwd_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(k2), _ptr(v2), g.data_ptr(),
                                  o.data_ptr(), lse.data_ptr(), qrows.data_ptr(), krows.data_ptr(), _ptr(bias),
                                  _ptr(boff), brow, G, I, wq, wk, D, Dv, Nq, Nk, Nk2, scale,
                                  *(x.data_ptr() for x in grads[:3]), _ptr(dk2), _ptr(dv2), _threads(G)):
        raise MemoryError("native items backward: no memory for a thread's scratch")
    return tuple(grads)


#: linear attention's feature maps the kernels apply themselves (identity: features computed beforehand;
#: favor+: Performer's positive random features, given the scaled projection and shift)
_LINEAR_MAPS = {"identity": 0, "elu": 1, "relu": 2, "favor+": 3}


def linear_map(name: str, x: torch.Tensor) -> int | None:
    """The kernels' code for feature map ``name`` when they can run linear attention on x (float32 on CPU,
    kernels built with vectors of 32 bytes or more; :func:`linear_forward` then runs inside an autograd
    Function), else None."""
    if name not in _LINEAR_MAPS or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    lib = _load()
    # built for 16-byte vectors only (no AVX), the kernels were slower than PyTorch's cores
    return _LINEAR_MAPS[name] if lib is not None and lib.sa_linear_vector_bytes() >= 32 else None


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _favor_args(favor: tuple | None, D: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """FAVOR+'s projection W' (F, D) and shift c (F), float32 contiguous, and the feature count F; (None, None,
    D) for the other maps."""
    if favor is None:
        return None, None, D
    proj, shift = (t.detach().to(torch.float32).contiguous() for t in favor)
    return proj, shift, proj.shape[0]


@_eager
def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, kind: int,
                   eps: float, group: int | None, favor: tuple[torch.Tensor, torch.Tensor] | None = None) -> \
        tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Linear attention's forward for float32 CPU tensors q (H·G, R, D), k (H, S, D), v (H, S, Dv) and keep
    (H, S) (1 real key, 0 padding) or None; ``kind`` from :func:`linear_map`; ``favor``: FAVOR+'s scaled
    projection W' (F, D) and shift c (F) (kind "favor+"). Non-causal when group is None (grouped query
    heads folded into R); else causal (R == S) with ``group`` query heads per key head. Returns out
    (H·G, R, Dv), den (H·G, R) and, non-causal, the states [Σ φ(k) vᵀ | Σ φ(k)] (H, F, Dv + 1); None when
    the kernels do not take these tensors."""
    found = _args((), (q, k, v, keep))
    if found is None:
        return None
    lib, (q, k, v, keep) = found
    H, S, D = k.shape
    proj, shift, F = _favor_args(favor, D)
    R, Dv = q.shape[1], v.shape[2]
    out = empty(q.shape[0], R, Dv)
    den = q.new_empty(q.shape[0], R)
    if group is None:
        kvz = q.new_empty(H, F, Dv + 1)
        status = lib.sa_linear_fwd_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(keep), _ptr(proj), _ptr(shift),
                                       H, R, S, D, F, Dv, kind, eps, out.data_ptr(), den.data_ptr(), kvz.data_ptr(),
                                       _threads(H * 8))
    else:
        kvz = None
        status = lib.sa_linear_causal_fwd_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(keep), _ptr(proj),
                                              _ptr(shift), H, group, S, D, F, Dv, kind, eps, out.data_ptr(),
                                              den.data_ptr(), _threads(H))
    if status:
        raise MemoryError("native linear attention: no memory for its states")
    return out, den, kvz


@_eager
def linear_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, kind: int,
                    group: int | None, kvz: torch.Tensor | None, g: torch.Tensor, out: torch.Tensor,
                    den: torch.Tensor, favor: tuple[torch.Tensor, torch.Tensor] | None = None) -> \
        tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The gradients (dq, dk, dv) of :func:`linear_forward` given g = ∂L/∂out and the forward's out, den
    and kvz; None when the kernels do not take these tensors."""
    found = _args((), (q, k, v, g, out, den, kvz, keep))
    if found is None:
        return None
    lib, (q, k, v, g, out, den, kvz, keep) = found
    H, S, D = k.shape
    proj, shift, F = _favor_args(favor, D)
    R, Dv = q.shape[1], v.shape[2]
    dq, dk, dv = empty(*q.shape), empty(*k.shape), empty(*v.shape)
    if group is None:
        status = lib.sa_linear_bwd_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(keep), _ptr(proj), _ptr(shift),
                                       kvz.data_ptr(), g.data_ptr(), out.data_ptr(), den.data_ptr(), H, R, S, D, F,
                                       Dv, kind, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), _threads(H * 8))
    else:
        status = lib.sa_linear_causal_bwd_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(keep), _ptr(proj),
                                              _ptr(shift), g.data_ptr(), out.data_ptr(), den.data_ptr(), H, group, S,
                                              D, F, Dv, kind, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), _threads(H))
    if status:
        raise MemoryError("native linear attention: no memory for its states")
    return dq, dk, dv
