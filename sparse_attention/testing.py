"""The project's tolerance rule, shared by the test suite and ``sparse-attention check``.

Rule (RELIABILITY.md (b)2, flash-attention's): with ``golden`` the reference in float64
and ``baseline`` the same computation in the input dtype, an implementation passes when

    max|impl - golden| <= factor * max|baseline - golden| + floor

with factor 2 for outputs and 3 for gradients, and ``floor`` about one ulp of the input
dtype at the data's magnitude (gradients: at least 1e-5, or 3e-5 when a sequence is
shorter than 64; float32 and float64: at least 8 eps * max|golden|, since their baseline
is (almost) exact and the ratio alone would be noise). Several baselines may be given; the
largest error counts (for half precision the suite passes the naive reference and
PyTorch's fused kernel on the dense problem, see tests/conftest.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0


@dataclass(frozen=True)
class Verdict:
    name: str
    error: float  # max|impl - golden| where golden is finite
    baseline: float  # max|baseline - golden|, the largest over the baselines
    floor: float
    factor: float
    nonfinite: int  # impl values that are NaN/inf where golden is finite

    @property
    def tolerance(self) -> float:
        return self.factor * self.baseline + self.floor

    @property
    def ok(self) -> bool:
        return self.nonfinite == 0 and self.error <= self.tolerance

    def __str__(self) -> str:
        extra = f", {self.nonfinite} non-finite values where the fp64 reference is finite" if self.nonfinite else ""
        return (f"{self.name}: max|impl-golden|={self.error:.3e} vs {self.factor}*max|baseline-golden| "
                f"({self.baseline:.3e}) + floor ({self.floor:.3e}) = {self.tolerance:.3e}{extra}")


def _max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def ulp_floor(golden: torch.Tensor, dtype: torch.dtype) -> float:
    """2 * max|(golden + 0.3 - 0.3) - golden| computed in ``dtype``: ~one ulp at the data's scale."""
    g = golden.to(dtype)
    return 2.0 * float(((g + 0.3) - 0.3).double().sub(golden).abs().max()) if golden.numel() else 0.0


def verdict(name: str, impl: torch.Tensor, baselines, golden: torch.Tensor, *, grad: bool = False,
            min_len: int = 64, factor: float | None = None) -> Verdict:
    """Apply the rule to one tensor (``baselines``: a tensor or a list of them, each of golden's shape).

    A baseline's error is taken where it and golden are finite: an overflowed or NaN baseline entry would
    make the tolerance inf or NaN (a broken baseline must not pass everything, nor fail an exact impl)."""
    baselines = list(baselines) if isinstance(baselines, (list, tuple)) else [baselines]
    if not baselines:
        raise ValueError(f"{name}: baselines must hold at least one tensor")
    for label, t in (("impl", impl), *(("baseline", b) for b in baselines)):
        if tuple(t.shape) != tuple(golden.shape):  # never broadcast: a wrong shape is a bug, not a pass
            raise ValueError(f"{name}: {label} has shape {tuple(t.shape)}, golden {tuple(golden.shape)}")
    factor = factor if factor is not None else (GRAD_FACTOR if grad else FORWARD_FACTOR)
    golden = golden.double()
    finite = torch.isfinite(golden)
    if not bool(finite.any()):
        return Verdict(name, 0.0, 0.0, 0.0, factor, 0)
    nonfinite = int((finite & ~torch.isfinite(impl)).sum())
    err = float((impl.double() - golden)[finite].abs().max())
    base = max(_max_abs((b.double() - golden)[finite & torch.isfinite(b)]) for b in baselines)
    floor = ulp_floor(golden[finite], impl.dtype)
    if impl.dtype in (torch.float32, torch.float64):  # the baseline is (almost) exact: allow a few ulps
        floor = max(floor, 8 * torch.finfo(impl.dtype).eps * float(golden[finite].abs().max()))
    if grad:
        floor = max(floor, 3e-5 if min_len < 64 else 1e-5)
    return Verdict(name, err, base, floor, factor, nonfinite)
