"""Shared helpers: the one tolerance rule, input factories and readable ids.

Tolerance rule (RELIABILITY.md (b)2, flash-attention's): with ``golden`` the reference
in float64 and ``ref_lp`` the same naive reference run in the input dtype
(``upcast=False``), the implementation must satisfy

    max|impl - golden| <= factor * max|ref_lp - golden| + floor

with factor 2 for the output and 3 for gradients, and ``floor`` about one ulp of the
input dtype at the data's magnitude (gradients: at least 1e-5, 3e-5 for short sequences;
fp32: at least 8 eps * max|golden|, since the fp32 baseline is nearly exact).

For half precision the baseline is the larger error of two same-dtype computations of
the dense problem: the naive reference, and PyTorch's fused SDPA kernel with the dense
mask. The block-sparse engine runs that same fused kernel, whose backward (like
flash-attention's) derives D = rowsum(dO * O) from the output rounded to the input
dtype; on rows with very few keys this alone can exceed 3x the naive error (observed:
dk 9.7e-3 against a naive 5.3e-4 for N=1, two attended keys, bf16, with SDPA and the
engine giving bitwise the same error).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import sparse_attention as sa
from sparse_attention.testing import ulp_floor, verdict

torch.backends.cuda.matmul.allow_tf32 = False  # hygiene (b)8; no-op on CPU

def _floor(golden: torch.Tensor, dtype: torch.dtype) -> float:
    return ulp_floor(golden, dtype)


def assert_within_baseline(name: str, impl, ref_lp, golden, *, grad: bool = False, min_len: int = 64,
                           factor: float | None = None) -> None:
    """The tolerance rule (sparse_attention.testing). ``name`` labels the tensor (out, dq, dk, dv).

    ``ref_lp``: the same-dtype baseline, or a list of them (the largest error counts).
    """
    baselines = list(ref_lp) if isinstance(ref_lp, (list, tuple)) else [ref_lp]
    assert impl is not None, f"{name}: implementation gave no tensor (gradient missing?)"
    assert impl.shape == golden.shape, f"{name}: shape {tuple(impl.shape)} != expected {tuple(golden.shape)}"
    assert impl.dtype == baselines[0].dtype, f"{name}: dtype {impl.dtype} != input dtype {baselines[0].dtype}"
    if golden.numel() == 0:
        return
    v = verdict(name, impl, baselines, golden, grad=grad, min_len=min_len, factor=factor)
    assert v.ok, str(v)


def make_qkv(B, Hq, Hkv, N, S, D, Dv=None, *, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def padding_mask(B: int, S: int, *, seed: int = 0, all_padded: int | None = None) -> torch.Tensor:
    """(B, S) bool, True = padding: a random ~30% of keys, and batch element ``all_padded`` fully padded."""
    g = torch.Generator().manual_seed(seed + 1000)
    m = torch.rand(B, S, generator=g) < 0.3
    if all_padded is not None:
        m[all_padded] = True
    return m


def dense_pattern_mask(pattern, N: int, S: int):
    return None if pattern is None else pattern.mask(N, S)


def run_and_grad(fn, q, k, v, g):
    """out = fn(q, k, v); returns (out, dq, dk, dv) for the upstream gradient g (detached)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g, allow_unused=True)
    return out.detach(), dq, dk, dv


def run_layer(fn, m: torch.nn.Module, inputs: list, grad_out: torch.Tensor) -> list:
    """[out, d(each input)..., d(each parameter of m)...] of out = fn(*inputs) for the upstream gradient
    grad_out (cast to the output's dtype); a gradient that does not reach a tensor is 0."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    targets = inputs + list(m.parameters())
    out = fn(*inputs)
    grads = torch.autograd.grad(out, targets, grad_out.to(out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets, strict=True)]


def check_against_reference(fn, q, k, v, pattern, *, key_padding_mask=None, scale=None, seed=0,
                            grads: bool = True) -> tuple:
    """Run ``fn`` and the reference (fp64 golden and input-dtype ref_lp); apply the rule to out and grads.

    Returns (impl_results, golden_results) as (out, dq, dk, dv) tuples.
    """
    N, S = q.shape[2], k.shape[2]
    mask = dense_pattern_mask(pattern, N, S)

    def ref(q_, k_, v_, upcast=True):
        return sa.reference_attention(q_, k_, v_, mask, key_padding_mask=key_padding_mask, scale=scale,
                                      upcast=upcast)

    gen = torch.Generator().manual_seed(seed + 7)
    B, Hq, _, _ = q.shape
    g = torch.randn(B, Hq, N, v.shape[-1], generator=gen, dtype=torch.float64)
    if not grads:
        with torch.no_grad():
            out = fn(q.detach(), k.detach(), v.detach())
            golden = ref(q.double(), k.double(), v.double())
            ref_lp = ref(q.detach(), k.detach(), v.detach(), upcast=False)
        assert_within_baseline("out", out, ref_lp, golden)
        return (out,), (golden,)
    impl = run_and_grad(fn, q, k, v, g.to(q.dtype))
    golden = run_and_grad(ref, q.double(), k.double(), v.double(), g)
    baselines = [run_and_grad(lambda a, b, c: ref(a, b, c, upcast=False), q, k, v, g.to(q.dtype))]
    if q.dtype in (torch.float16, torch.bfloat16):
        baselines.append(run_and_grad(_fused_sdpa(mask, key_padding_mask, scale), q, k, v, g.to(q.dtype)))
    min_len = min(N, S)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        lps = [b[i] if b[i] is not None else torch.zeros_like(impl[i]) for b in baselines]
        gd = golden[i] if golden[i] is not None else torch.zeros_like(impl[i], dtype=torch.float64)
        assert_within_baseline(name, impl[i], lps, gd, grad=i > 0, min_len=min_len)
    return impl, golden


def _fused_sdpa(mask, key_padding_mask, scale):
    """PyTorch's fused SDPA on the dense problem (the kernel the block-sparse engine batches)."""

    def fn(q, k, v):
        B, Hq, N, _ = q.shape
        S = k.shape[2]
        allowed = torch.ones(B, Hq, N, S, dtype=torch.bool)
        if mask is not None:
            allowed = allowed & mask
        if key_padding_mask is not None:
            allowed = allowed & ~key_padding_mask[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                                                enable_gqa=Hq != k.shape[1])
    return fn


def registry_id(m) -> str:
    return m.name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def use_avx2_build(monkeypatch, tmp_path_factory) -> None:
    """Switches the native kernels, for the rest of the test, to a rebuild for AVX2 (-march=haswell: 32-byte
    vectors, no AVX-512, as on CI machines without it: e.g. the scalar tile transposition of the items
    kernels), built once per session into a cache directory of its own; skips where that cannot be built."""
    from sparse_attention import native

    flags = native._cpu_flags().split()
    if sys.platform != "linux" or os.uname().machine != "x86_64" or not native.available() or \
            not {"avx2", "fma"} <= set(flags):
        pytest.skip("an AVX2 rebuild needs an x86-64 Linux machine with AVX2 and FMA, and the native kernels")
    monkeypatch.setenv("SPARSE_ATTENTION_CACHE", str(tmp_path_factory.getbasetemp() / "sa-avx2"))
    monkeypatch.setattr(native, "_ATTEMPTS", (["-march=haswell", "-fopenmp"],))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    if not native.available():
        pytest.skip(f"no AVX2 build here: {native.status()}")
    assert native._lib.sa_linear_vector_bytes() == 32, native.status()


@pytest.fixture(params=["this-cpu", "avx2"])
def native_build(request, monkeypatch, tmp_path_factory):
    """The native kernels as built for this machine, or rebuilt for AVX2 (``use_avx2_build``); the machine's
    build comes back after the test."""
    from sparse_attention import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    if request.param == "avx2":
        use_avx2_build(monkeypatch, tmp_path_factory)
    return request.param
