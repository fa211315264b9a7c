"""Process-wide CPU allocator setting for long sequences (opt-in; the library never applies it itself).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc maps every allocation over 32 MB
afresh with ``mmap`` and gives it back on ``free``, and it returns freed heap memory above its trim
threshold to the OS. The next call then page-faults the same amount in again, 4 kB at a time (about
0.25 ms per MB on the machine of benchmarks/RESULTS.md): from N ≈ 16384 on, every N × 512 fp32
tensor of an attention call (outputs, gradients, sorted copies) pays it on every call.

:func:`keep_freed_memory` raises both thresholds, so that freed memory stays in the process and is
reused by the next call. Measured fwd+bwd at N=16384 (``benchmarks/bench_allocator.py --setting
glibc``, fresh processes alternating): 1.2-1.8x faster for ProbSparse, LSH, Reformer, routing,
Sinkhorn and linear attention, unchanged for dense SDPA, sliding window and TopK; peak resident
memory 0-30% higher. The cost is that memory freed by a call is not returned to the OS while the
process lives.
"""

from __future__ import annotations

import ctypes
import platform

from ._checks import check_int

_M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    Sets, for the whole process and for the rest of its life, glibc's mmap threshold and trim
    threshold to ``limit`` bytes (``mallopt``; the same as starting Python with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=LIMIT:glibc.malloc.trim_threshold=LIMIT``): blocks
    smaller than ``limit`` come from the heap and stay there when freed. It can be called at any time;
    it affects allocations made after it. glibc cannot be put back into its default (dynamic)
    thresholds afterwards.

    Args:
        limit: bytes, 1 <= limit <= 2**31 - 1 (default 1 GiB).

    Returns:
        True if glibc accepted both settings; False where the C library is not glibc (macOS, musl),
        where nothing is changed. With another malloc preloaded (jemalloc, tcmalloc) glibc's
        settings have no effect on PyTorch's tensors.
    """
    limit = check_int("limit", limit, minimum=1)
    if limit > 2**31 - 1:
        raise ValueError(f"limit must be at most 2**31 - 1 bytes (mallopt takes a C int), got {limit}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
