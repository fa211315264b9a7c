"""Benchmark every registered mechanism against dense SDPA on this machine.

For each length, dense SDPA (full attention) runs first on the same inputs; each
mechanism then reports its time (median of repeats after a warm-up call), its peak
memory above the inputs, its speed relative to dense SDPA, and how far its output is
from full attention (max and mean relative error). Failures (out of memory, inputs a
mechanism cannot take) become rows that say so.

Mechanisms of kind "module" (Performer, Linformer, ...) run as their head-split module,
built for the benchmark's head dim and heads, in eval mode; a fixed-length one is built for
the length being measured (its ``length_option`` set to N, unless given in ``options``), and
options sized by ``length_defaults`` (Routing: ⌈√N⌉ clusters) are taken unless given.
Their density is left empty (they are not sparse), and so is the error of a ``learned``
one (untrained, its distance from full attention means nothing) and of Reformer's (its keys
are its queries, so it computes another attention than the reference).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import registry
from .dynamic import DynamicPattern, explain
from .functional import attention


@dataclass
class Row:
    mechanism: str
    seq_len: int
    mode: str  # "fwd" or "fwd+bwd"
    status: str  # "ok", or why there is no figure
    time_ms: float | None = None
    peak_memory_mb: float | None = None
    dense_time_ms: float | None = None
    dense_peak_memory_mb: float | None = None
    speedup_vs_dense: float | None = None  # dense time / time
    memory_vs_dense: float | None = None  # peak memory / dense peak memory
    density: float | None = None  # attended pairs / (N * S)
    max_rel_error: float | None = None  # max|out - full| / max|full|
    mean_rel_error: float | None = None  # mean|out - full| / mean|full|
    samples_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc), so resident memory counts live tensors only."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of this process during a block, above its start.

    CPU: resident memory from Linux /proc (the high-water mark is reset on entry, after
    freed heap memory is handed back to the OS); None where /proc is not available.
    CUDA: torch.cuda.max_memory_allocated.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        self.start = self._status("VmRSS:")
        try:  # reset the high-water mark to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            peak = self._status("VmHWM:")
            self.peak_bytes = None if peak is None else max(peak - self.start, 0)
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[list[float], int | None]:
    """Run ``fn`` once to warm up, once more for its peak memory, then ``repeats`` timed runs. (Peak memory
    on the warm-up call counted one-time costs too: the process's first dense call showed 2.4 MB where the
    same call needs 0.02 MB, and turned the first length's "memory vs dense" ratios into nonsense.)"""
    fn()
    _sync(device)
    with PeakMemory(device) as mem:
        fn()
        _sync(device)
    samples = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return samples, mem.peak_bytes


def _runner(call: Callable, q, k, v, backward: bool) -> Callable[[], torch.Tensor]:
    if not backward:
        def fwd():
            with torch.no_grad():
                return call(q, k, v)
        return fwd
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    grad = torch.randn_like(qg[..., : v.shape[-1]])

    def fwd_bwd():
        out = call(qg, kg, vg)
        out.backward(grad)
        qg.grad = kg.grad = vg.grad = None
        return out
    return fwd_bwd


def _rel_errors(out: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    diff = (out.double() - full.double()).abs()
    ref = full.double().abs()
    return float(diff.max() / ref.max().clamp_min(1e-30)), float(diff.mean() / ref.mean().clamp_min(1e-30))


def run(mechanisms: Iterable[str], seq_lens: Iterable[int], *, heads: int = 8, dim: int = 64, batch: int = 1,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", backward: bool = False,
        repeats: int = 3, options: dict | None = None, progress: Callable[[str], None] | None = None,
        seed: int = 0) -> list[Row]:
    """Benchmark rows for every (length, mechanism); the dense SDPA row of each length comes first."""
    device = torch.device(device)
    mechs = [registry.get(m) for m in mechanisms]
    mode = "fwd+bwd" if backward else "fwd"
    rows: list[Row] = []
    for n in seq_lens:
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(device, dtype) for _ in range(3))
        dense = Row("dense SDPA", n, mode, "ok", density=1.0)
        full = None
        try:
            samples, peak = measure(_runner(F.scaled_dot_product_attention, q, k, v, backward), device, repeats)
            with torch.no_grad():
                full = F.scaled_dot_product_attention(q, k, v)
            dense.time_ms = statistics.median(samples) * 1e3
            dense.samples_ms = [s * 1e3 for s in samples]
            dense.peak_memory_mb = None if peak is None else peak / 2**20
            dense.max_rel_error = dense.mean_rel_error = 0.0
        except (RuntimeError, MemoryError) as e:  # noqa: PERF203 - a failure becomes a row
            dense.status = _failure(e)
        rows.append(dense)
        if progress:
            progress(f"N={n} dense SDPA")
        for m in mechs:
            rows.append(_bench_one(m, (options or {}).get(m.name, {}), q, k, v, full, dense, mode, backward,
                                   device, repeats))
            if progress:
                progress(f"N={n} {m.name}")
        del q, k, v, full
        gc.collect()
    return rows


def _failure(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate" in text.lower():
        return "out of memory"
    return f"unsupported: {text[:160]}"


def _bench_one(mech, opts, q, k, v, full, dense: Row, mode, backward, device, repeats) -> Row:
    n = q.shape[2]
    row = Row(mech.name, n, mode, "ok")
    try:
        comparable = True
        if mech.kind == "module":
            call, comparable = _module_call(mech, opts, q)
        else:
            pattern = mech.make(**opts)
            if isinstance(pattern, DynamicPattern):  # pairs kept on these very inputs
                small = q.shape[0] * q.shape[1] * n * n <= 1 << 27
                row.density = float(explain(q, k, pattern).float().mean()) if small else None
            else:
                row.density = pattern.stats(n, n).density
            call = lambda a, b, c: attention(a, b, c, pattern)  # noqa: E731
        samples, peak = measure(_runner(call, q, k, v, backward), device, repeats)
        row.time_ms = statistics.median(samples) * 1e3
        row.samples_ms = [s * 1e3 for s in samples]
        row.peak_memory_mb = None if peak is None else peak / 2**20
        if full is not None and comparable:
            with torch.no_grad():
                row.max_rel_error, row.mean_rel_error = _rel_errors(call(q, k, v), full)
    except (RuntimeError, MemoryError, ValueError) as e:
        row.status = _failure(e)
        return row
    if dense.time_ms:
        row.dense_time_ms = dense.time_ms
        row.speedup_vs_dense = dense.time_ms / row.time_ms
    if dense.peak_memory_mb and row.peak_memory_mb is not None:
        row.dense_peak_memory_mb = dense.peak_memory_mb
        row.memory_vs_dense = row.peak_memory_mb / dense.peak_memory_mb
    return row


def _module_call(mech, opts: dict, q: torch.Tensor) -> tuple[Callable, bool]:
    """(q, k, v) -> out through the mechanism's head-split module, built for q's head dim and heads
    (a fixed-length one for q's length), on q's device and dtype, in eval mode; and whether its
    output is comparable with full attention on the same q, k, v (see the module docstring)."""
    B, H, n, D = q.shape
    if mech.length_option is not None:
        opts = {mech.length_option: n, **opts}
    if mech.length_defaults is not None:
        opts = {**mech.length_defaults(n), **opts}
    module = mech.make(head_dim=D, num_heads=H, num_kv_heads=H, **opts).to(q.device, q.dtype).eval()
    if getattr(module, "shared_qk", False):  # Reformer: the queries are the keys
        return (lambda a, b, c: module(a, c)), False
    return (lambda a, b, c: module(a, b, c)), not mech.learned


def fmt(x: float | None, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)
