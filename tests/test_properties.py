"""Property-based tests (hypothesis): laws that hold for any pattern, length and block size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_baseline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_attention as sa
import sparse_attention.engine.blocksparse as bs
from sparse_attention.engine import _run_blocksparse

PROPS = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(PROPS, max_examples=12)

LENGTHS = st.sampled_from([1, 2, 3, 5, 7, 11, 15, 16, 17, 31, 33, 37, 63, 64, 65])
SMALL = st.integers(0, 9)


@st.composite
def base_patterns(draw):
    kind = draw(st.sampled_from(["full", "causal", "window", "strided", "block_local", "global", "random",
                                 "longformer", "bigbird"]))
    causal = draw(st.booleans())
    if kind == "full":
        return sa.Full()
    if kind == "causal":
        return sa.Causal()
    if kind == "window":
        return sa.SlidingWindow(draw(SMALL), causal=causal)
    if kind == "strided":
        return sa.Strided(draw(st.integers(1, 6)), causal=causal)
    if kind == "block_local":
        return sa.BlockLocal(draw(st.integers(1, 20)))
    if kind == "global":
        return sa.Global(draw(st.lists(st.integers(0, 3), max_size=3)))  # valid for S >= 4 only
    if kind == "random":
        return sa.RandomBlocks(draw(st.integers(0, 3)), block=draw(st.integers(1, 12)), seed=draw(SMALL))
    if kind == "longformer":
        return sa.Longformer(draw(SMALL), global_indices=draw(st.lists(st.integers(0, 3), max_size=2)),
                             dilation=draw(st.integers(1, 3)), causal=causal)
    return sa.BigBird(block=draw(st.integers(1, 12)), window_blocks=draw(st.sampled_from([1, 3, 5])),
                      global_blocks=draw(st.integers(0, 3)), random_blocks=draw(st.integers(0, 2)),
                      seed=draw(SMALL))


@st.composite
def patterns(draw):
    p = draw(base_patterns())
    op = draw(st.sampled_from(["plain", "or", "and"]))
    if op == "or":
        p = p | draw(base_patterns())
    elif op == "and":
        p = p & draw(base_patterns())
    return p


def _defined(p, N, S) -> bool:
    try:
        p.check_lengths(N, S)
        return True
    except ValueError:
        return False


@PROPS
@given(a=patterns(), b=patterns(), N=LENGTHS, S=LENGTHS)
def test_union_is_monotone_and_intersection_shrinks(a, b, N, S):
    if not (_defined(a, N, S) and _defined(b, N, S)):
        return
    ma, mb = a.mask(N, S), b.mask(N, S)
    mu, mi = (a | b).mask(N, S), (a & b).mask(N, S)
    assert torch.equal(mu, ma | mb), "mask(a|b) != mask(a) | mask(b)"
    assert torch.equal(mi, ma & mb), "mask(a&b) != mask(a) & mask(b)"
    assert not (ma & ~mu).any(), "mask(a|b) must contain mask(a)"
    assert not (mi & ~ma).any(), "mask(a&b) must be inside mask(a)"


@PROPS
@given(p=patterns(), N=LENGTHS, S=LENGTHS, block=st.sampled_from([1, 3, 4, 16, 17, 32, 64]))
def test_layout_covers_mask_for_any_pattern(p, N, S, block):
    if not _defined(p, N, S):
        return
    m = p.mask(N, S)
    dense = p.layout(N, S, block).to_dense()[0]
    cover = dense.repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :S]
    assert not (m & ~cover).any(), f"{p!r}: layout misses allowed pairs at block {block}"


@st.composite
def attention_inputs(draw):
    p = draw(patterns())
    N, S = draw(LENGTHS), draw(LENGTHS)
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([3, 7, 8]))
    Dv = draw(st.sampled_from([D, 5]))
    B = draw(st.sampled_from([1, 2]))
    block = draw(st.sampled_from([4, 16, 32]))
    padded = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return p, B, Hkv * G, Hkv, N, S, D, Dv, block, padded, seed


def _make(B, Hq, Hkv, N, S, D, Dv, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype)
    kpm = torch.rand(B, S, generator=g) < 0.3
    return q, k, v, kpm


@PROPS
@given(x=attention_inputs())
def test_blocksparse_equals_dense_reference(x):
    """RELIABILITY (d)1: any pattern, any lengths and block size, fp32, under the tolerance rule."""
    p, B, Hq, Hkv, N, S, D, Dv, block, padded, seed = x
    if not _defined(p, N, S):
        return
    q, k, v, kpm = _make(B, Hq, Hkv, N, S, D, Dv, seed)
    kpm = kpm if padded else None
    mask = p.mask(N, S)
    out = _run_blocksparse(q, k, v, p, scale=D**-0.5, key_padding_mask=kpm, block=block)
    golden = sa.reference_attention(q.double(), k.double(), v.double(), mask, key_padding_mask=kpm)
    ref_lp = sa.reference_attention(q, k, v, mask, key_padding_mask=kpm, upcast=False)
    assert_within_baseline("out", out, ref_lp, golden)
    allowed = mask.expand(B, Hq, N, S) if mask.dim() == 2 else mask.expand(B, Hq, N, S)
    if kpm is not None:
        allowed = allowed & ~kpm[:, None, None, :]
    empty = ~allowed.any(-1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "out: empty rows must be exactly 0"


@FEW
@given(x=attention_inputs())
def test_masked_value_invariance(x):
    """Overwriting k/v at keys no query may attend with finite values up to 1e30 changes nothing."""
    p, B, Hq, Hkv, N, S, D, Dv, block, padded, seed = x
    if not _defined(p, N, S):
        return
    q, k, v, kpm = _make(B, Hq, Hkv, N, S, D, Dv, seed)
    mask = p.mask(N, S)
    unseen = ~mask.reshape(-1, S).any(0)  # (S,) keys no query (of any head) attends
    dead = unseen.view(1, S) | kpm  # (B, S) also padded keys
    g = torch.Generator().manual_seed(seed + 1)
    k2, v2 = k.clone(), v.clone()
    big = lambda t: (torch.rand(t.shape, generator=g) * 2 - 1) * 1e30  # noqa: E731
    idx = dead[:, None, :, None]
    k2 = torch.where(idx, big(k2), k2)
    v2 = torch.where(idx, big(v2), v2)
    for name, fn in (
        ("blocksparse", lambda kk, vv: _run_blocksparse(q, kk, vv, p, scale=D**-0.5, key_padding_mask=kpm,
                                                        block=block)),
        ("dense", lambda kk, vv: sa.attention(q, kk, vv, p, key_padding_mask=kpm, backend="dense")),
    ):
        a, b = fn(k, v), fn(k2, v2)
        assert torch.isfinite(b).all(), f"{name}: out not finite with 1e30 at masked keys"
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n} out: {m}")


@FEW
@given(N=LENGTHS, S=LENGTHS, Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 3]), D=st.sampled_from([1, 7, 16]),
       seed=st.integers(0, 1000), backend=st.sampled_from(["auto", "blocksparse", "dense"]))
def test_full_equals_sdpa(N, S, Hkv, G, D, seed, backend):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, Hkv * G, N, D, generator=g)
    k, v = torch.randn(2, Hkv, S, D, generator=g), torch.randn(2, Hkv, S, D, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=G > 1)
    out = sa.attention(q, k, v, sa.Full(), backend=backend)
    torch.testing.assert_close(out, ref, atol=3e-6, rtol=3e-6, msg=lambda m: f"out vs SDPA: {m}")


@FEW
@given(N=LENGTHS, S=LENGTHS, window=SMALL, seed=st.integers(0, 1000))
def test_key_permutation_invariance_full(N, S, window, seed):
    """Full attention: permuting keys and values jointly leaves the output unchanged."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 2, N, 8, generator=g), torch.randn(1, 2, S, 8, generator=g), torch.randn(
        1, 2, S, 8, generator=g)
    perm = torch.randperm(S, generator=g)
    for backend in ("blocksparse", "dense"):
        a = sa.attention(q, k, v, sa.Full(), backend=backend)
        b = sa.attention(q, k[:, :, perm], v[:, :, perm], sa.Full(), backend=backend)
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6, msg=lambda m, backend=backend: f"{backend} out: {m}")


@FEW
@given(x=attention_inputs())
def test_chunked_execution_equals_unchunked(x):
    """Splitting segments into row chunks (ROW_CHUNK_BYTES) must not change the result."""
    p, B, Hq, Hkv, N, S, D, Dv, block, padded, seed = x
    if not _defined(p, N, S):
        return
    q, k, v, kpm = _make(B, Hq, Hkv, N, S, D, Dv, seed)
    kpm = kpm if padded else None
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    qc, kc, vc = (t.clone().requires_grad_() for t in (q, k, v))
    gout = torch.randn(B, Hq, N, Dv)
    a = _run_blocksparse(qs, ks, vs, p, scale=0.5, key_padding_mask=kpm, block=block)
    ga = torch.autograd.grad(a, (qs, ks, vs), gout)
    old = bs.ROW_CHUNK_BYTES
    bs.ROW_CHUNK_BYTES = 1  # one query block per chunk
    try:
        b = _run_blocksparse(qc, kc, vc, p, scale=0.5, key_padding_mask=kpm, block=block)
        gb = torch.autograd.grad(b, (qc, kc, vc), gout)
    finally:
        bs.ROW_CHUNK_BYTES = old
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"out: {m}")
    for n, x1, x2 in zip(("dq", "dk", "dv"), gb, ga, strict=True):
        torch.testing.assert_close(x1, x2, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@FEW
@given(x=attention_inputs())
def test_gqa_equals_repeated_kv(x):
    """GQA: the output equals the call with repeat_interleave'd k/v (query head h reads kv head h // G)."""
    p, B, Hq, Hkv, N, S, D, Dv, block, padded, seed = x
    if not _defined(p, N, S) or Hq == Hkv:
        return
    q, k, v, kpm = _make(B, Hq, Hkv, N, S, D, Dv, seed)
    G = Hq // Hkv
    a = _run_blocksparse(q, k, v, p, scale=0.5, key_padding_mask=kpm, block=block)
    b = _run_blocksparse(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), p, scale=0.5,
                         key_padding_mask=kpm, block=block)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6, msg=lambda m: f"out: {m}")


@FEW
@given(x=attention_inputs())
def test_no_cross_talk_between_batch_elements(x):
    """Each batch element computed alone equals its slice of the batched call."""
    p, B, Hq, Hkv, N, S, D, Dv, block, padded, seed = x
    if not _defined(p, N, S) or B == 1:
        return
    q, k, v, kpm = _make(B, Hq, Hkv, N, S, D, Dv, seed)
    full = _run_blocksparse(q, k, v, p, scale=0.5, key_padding_mask=kpm, block=block)
    for i in range(B):
        one = _run_blocksparse(q[i : i + 1], k[i : i + 1], v[i : i + 1], p, scale=0.5,
                               key_padding_mask=kpm[i : i + 1], block=block)
        torch.testing.assert_close(one, full[i : i + 1], atol=2e-6, rtol=2e-6, msg=lambda m, i=i: f"out[{i}]: {m}")


@pytest.mark.slow
@settings(PROPS, max_examples=300)
@given(x=attention_inputs())
def test_blocksparse_equals_dense_reference_long_sweep(x):
    test_blocksparse_equals_dense_reference.hypothesis.inner_test(x)
