"""Native (C) kernels for the steps PyTorch has no fast operator for, compiled on first use.

The only one so far is the row-wise top-k that TopK and Routing select with (``topk.c``): two
vectorised passes over each row instead of ``torch.topk``'s per-element heap or quickselect.

The source is compiled once per machine with the C compiler found (``$CC``, else ``cc``/``gcc``/
``clang``), ``-O3 -march=native -fopenmp`` (without ``-fopenmp`` if that fails), into
``$SPARSE_ATTENTION_CACHE`` (default ``~/.cache/sparse_attention``), keyed by the source, the
compiler command and the CPU's flags, and loaded with ctypes. Built with OpenMP, the kernels run on
PyTorch's own OpenMP threads (see topk.c). Where there is no compiler, or it fails, or
``SPARSE_ATTENTION_NATIVE=0``, the callers use their PyTorch path: the same results, slower.
``status()`` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
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

__all__ = ["available", "status", "topk_rows"]

_SOURCE = Path(__file__).with_name("topk.c")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
# OpenMP first: the kernels then run on PyTorch's own OpenMP threads (see topk.c); without it, on one thread
_THREADING = (["-fopenmp"], [])
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # None: not tried yet


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


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("SPARSE_ATTENTION_NATIVE", "1") == "0":
        return None, "disabled by SPARSE_ATTENTION_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(cc + _FLAGS).encode(), platform.machine().encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"sa_topk-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            where = target.parent
        except OSError:  # no writable cache: build for this process only
            where = Path(tempfile.mkdtemp(prefix="sparse_attention-"))
            target = where / target.name
        errors = []
        for extra in _THREADING:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=where)
            os.close(fd)
            cmd = cc + _FLAGS + extra + ["-o", tmp, str(_SOURCE)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                error = None if done.returncode == 0 else f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()}"
            except (OSError, subprocess.TimeoutExpired) as e:
                error = f"`{' '.join(cmd)}` could not run: {e}"
            if error is None:
                os.replace(tmp, target)  # atomic: a process building the same file at once reads a whole one
                break
            os.unlink(tmp)
            errors.append(error)
        else:
            return None, "\n".join(errors)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"{target} could not be loaded: {e}"
    fn = lib.sa_topk_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
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


def status() -> str:
    """Why the native kernels are (or are not) in use."""
    _load()
    return _reason or ""


def topk_rows(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The native top-k of each row of a CPU float32 tensor s (..., S), 0 < k <= S: (values, columns)
    (..., k), each row in ascending column order. Entries rank by value, NaN above every number,
    equal values by lower column; the first k in that order are kept. None when the kernels are not
    available or s does not qualify (other dtype or device, or autograd would need to track values).
    """
    if s.device.type != "cpu" or s.dtype != torch.float32 or (s.requires_grad and torch.is_grad_enabled()):
        return None
    lib = _load()
    S = s.shape[-1]
    if lib is None or not 0 < k <= S:
        return None
    flat = s.reshape(-1, S)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    values = torch.empty(rows, k, dtype=torch.float32)
    cols = torch.empty(rows, k, dtype=torch.long)
    if rows:
        row_stride = flat.stride(0) if rows > 1 else S
        threads = max(1, min(torch.get_num_threads(), rows))
        if lib.sa_topk_f32(flat.data_ptr(), rows, S, row_stride, k, values.data_ptr(), cols.data_ptr(), threads):
            raise MemoryError(f"native top-k: no memory for the scratch of {threads} thread(s), S={S}, k={k}")
    lead = s.shape[:-1]
    return values.view(*lead, k), cols.view(*lead, k)
