"""Linear attention (elu+1, ReLU, FAVOR+) against its explicit quadratic form, and FAVOR+ statistics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within_baseline, make_qkv, padding_mask, run_and_grad

import sparse_attention as sa
from sparse_attention import native
from sparse_attention.approx import FavorPlus, linear, reference_linear_attention

SHAPES = [  # B, Hq, Hkv, N, S, D, Dv
    (1, 1, 1, 1, 1, 4, 4),
    (2, 4, 2, 37, 37, 7, 5),
    (1, 3, 1, 97, 61, 16, 16),
    (2, 2, 2, 130, 130, 8, 3),
    (1, 2, 1, 150, 530, 16, 9),  # several row chunks of the native states: S = 530 keys, G·N = 300 query rows
]


def _id(s):
    return "B{}-H{}/{}-N{}-S{}-D{}-Dv{}".format(*s)


def _fmap(name, D):
    return FavorPlus(D, 32, seed=1) if name == "favor+" else name


@pytest.fixture(params=["native", "torch"])
def linear_path(request, monkeypatch):
    """The native cores (float32 on CPU, elu/relu/callable maps: sparse_attention/native/linear.c), or the
    PyTorch cores they replace (the path without a compiler, and for float64 and FAVOR+)."""
    if request.param == "native":
        if not native.available():
            pytest.skip(f"native kernels unavailable: {native.status()}")
    else:
        monkeypatch.setattr(linear, "_native_kind", lambda fm, x: None)
    return request.param


@pytest.fixture
def torch_path(monkeypatch):
    """Tests of the PyTorch cores' own blocking and memory: the native cores stepped aside."""
    monkeypatch.setattr(linear, "_native_kind", lambda fm, x: None)


@pytest.fixture
def small_segments(monkeypatch):
    """Force several segments of the causal loop even at test sizes."""
    monkeypatch.setattr(linear, "_SEGMENT_ROWS", 16)


@pytest.mark.parametrize("fmap", ["elu", "relu", "favor+"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("masked", [False, True], ids=["", "kpm"])
def test_matches_quadratic_form(shape, causal, fmap, masked, small_segments, linear_path):
    B, Hq, Hkv, N, S, D, Dv = shape
    if causal and N != S:
        pytest.skip("causal needs N == S")
    fm = _fmap(fmap, D)
    kpm = padding_mask(B, S, all_padded=B - 1 if B > 1 else None) if masked else None
    opts = dict(feature_map=fm, causal=causal, key_padding_mask=kpm)
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, Dv, dtype=torch.float32)
    g = torch.randn(B, Hq, N, Dv, dtype=torch.float64)
    impl = run_and_grad(lambda a, b, c: sa.linear_attention(a, b, c, chunk_size=5, **opts), q, k, v, g.float())
    golden = run_and_grad(lambda a, b, c: reference_linear_attention(a, b, c, **opts), q.double(), k.double(),
                          v.double(), g)
    ref_lp = run_and_grad(lambda a, b, c: reference_linear_attention(a, b, c, **opts), q, k, v, g.float())
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_within_baseline(name, impl[i], ref_lp[i], golden[i], grad=i > 0, min_len=min(N, S))
    # the fast path in float64 is the quadratic form up to rounding
    impl64 = run_and_grad(lambda a, b, c: sa.linear_attention(a, b, c, chunk_size=5, **opts), q.double(),
                          k.double(), v.double(), g)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        torch.testing.assert_close(impl64[i], golden[i], rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("fmap", ["elu", "relu", "favor+"])
def test_fully_padded_rows_are_zero(causal, fmap, linear_path):
    B, H, N, D = 2, 2, 11, 4
    q, k, v = make_qkv(B, H, H, N, N, D)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1] = True
    k.data[1, :, 3] = float("inf")  # a non-finite value at a padded key must not leak
    v.data[1, :, 5] = float("nan")
    out = sa.linear_attention(q, k, v, feature_map=_fmap(fmap, D), causal=causal, key_padding_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.backward(torch.randn_like(out))
    for name, t in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_relu_all_zero_features_give_zero(linear_path):
    q = -torch.rand(1, 1, 3, 4)  # relu(q) == 0 everywhere
    k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 2)
    assert torch.equal(sa.linear_attention(q, k, v, feature_map="relu"), torch.zeros(1, 1, 3, 2))


@pytest.mark.parametrize("fmap", ["elu", "relu", "favor+"])
def test_causal_never_reads_future_keys(fmap, small_segments, linear_path):
    B, H, N, D, t = 2, 3, 50, 8, 23
    q, k, v = make_qkv(B, H, H, N, N, D, requires_grad=False)
    fm = _fmap(fmap, D)
    out = sa.linear_attention(q, k, v, feature_map=fm, causal=True, chunk_size=7)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] = torch.randn_like(k2[:, :, t + 1:])
    v2[:, :, t + 1:] = 100 * torch.randn_like(v2[:, :, t + 1:])
    out2 = sa.linear_attention(q, k2, v2, feature_map=fm, causal=True, chunk_size=7)
    assert torch.equal(out2[:, :, : t + 1], out[:, :, : t + 1])
    assert not torch.equal(out2[:, :, t + 1:], out[:, :, t + 1:])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("fmap", ["elu", "favor+"])
def test_gradcheck(causal, fmap, small_segments):
    q, k, v = make_qkv(1, 2, 1, 9, 9, 3, 2, dtype=torch.float64)
    kpm = torch.tensor([[False] * 7 + [True] * 2])
    fm = _fmap(fmap, 3)
    # eps=0: FAVOR+'s detached row stabiliser then cancels exactly, so autograd's gradient is exact
    fn = lambda a, b, c: sa.linear_attention(a, b, c, feature_map=fm, causal=causal, chunk_size=4,  # noqa: E731
                                            key_padding_mask=kpm, eps=0.0)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("fmap", ["elu", "favor+", "callable"])
@pytest.mark.parametrize("budget", ["head-groups", "row-blocks", "tiny"])
@pytest.mark.parametrize("keep", ["keep-features", "recompute"])
def test_blocking_does_not_change_results(causal, fmap, budget, keep, monkeypatch, torch_path):
    """The cores work block by block (groups of whole heads, or runs of rows of one head); any blocking
    gives the single-block result and gradients up to rounding, whether the backward reuses the forward's
    features or recomputes them (over _KEEP_FEATURES_BYTES)."""
    B, H, N, D = 2, 3, 40, 4
    q, k, v = make_qkv(B, H, H, N, N, D, dtype=torch.float64)
    kpm = padding_mask(B, N)
    fm = {"elu": "elu", "favor+": FavorPlus(D, 8, seed=2), "callable": lambda x: torch.sigmoid(x)}[fmap]
    fn = lambda a, b, c: sa.linear_attention(a, b, c, feature_map=fm, causal=causal, chunk_size=8,  # noqa: E731
                                            key_padding_mask=kpm)
    g = torch.randn(B, H, N, D, dtype=torch.float64)
    whole = run_and_grad(fn, q, k, v, g)
    width = 8 if fmap == "favor+" else D  # features per row: blocks hold about _BLOCK_BYTES of them
    rows = {"head-groups": 2 * N, "row-blocks": 16, "tiny": 1}[budget]  # rows of features per block
    share = linear._CAUSAL_SHARE if causal else 1
    monkeypatch.setattr(linear, "_BLOCK_BYTES", share * rows * max(width, 8) * 8)
    if keep == "keep-features":
        monkeypatch.setattr(linear, "_KEEP_FEATURES_BYTES", 1 << 30)
    else:
        monkeypatch.setattr(linear, "_keep_features", lambda *a: False)
    blocked = run_and_grad(fn, q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), blocked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("m", [1, 2, 5, 12, 16, 63, 64])
@pytest.mark.parametrize("upper", [False, True], ids=["prefix", "suffix"])
def test_chunk_prefix_sums(m, upper):
    """The causal core's exclusive prefix (suffix) sums over chunks equal the sums of the earlier (later)
    items; a NaN item reaches only the sums that include it."""
    x = torch.randn(3, m, 4, 5, dtype=torch.float64)
    bad = m // 2
    x[1, bad, 2, 3] = float("nan")
    got = linear._prefix(x, upper=upper)
    for c in range(m):
        want = x[:, c + 1:].sum(1) if upper else x[:, :c].sum(1)
        torch.testing.assert_close(got[:, c], want, rtol=1e-12, atol=1e-12, equal_nan=True,
                                   msg=lambda s, c=c: f"chunk {c}: {s}")
        assert bool(got[1, c].isnan().any()) == (c < bad if upper else c > bad), f"chunk {c}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_favor_closed_form_gradients_with_shift(causal):
    """At D = 64 some projection rows have |w|²/2 > 40, so FAVOR+ moves a constant c_f from the keys to
    the queries; the cores' closed-form feature gradients must still equal autograd on the reference."""
    fm = FavorPlus(64, 100, seed=3)
    assert bool((fm._shift(torch.float64, torch.device("cpu")) > 0).any())
    q, k, v = (0.3 * t for t in make_qkv(2, 2, 2, 50, 50, 64, dtype=torch.float64))
    g = torch.randn(2, 2, 50, 64, dtype=torch.float64)
    fast = run_and_grad(lambda a, b, c: sa.linear_attention(a, b, c, feature_map=fm, causal=causal, chunk_size=8),
                        q, k, v, g)
    golden = run_and_grad(lambda a, b, c: reference_linear_attention(a, b, c, feature_map=fm, causal=causal),
                          q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, golden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_smoke(causal, linear_path):
    q, k, v = make_qkv(2, 4, 2, 70, 70, 16, dtype=torch.bfloat16)
    out = sa.linear_attention(q, k, v, causal=causal)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    golden = reference_linear_attention(q.double(), k.double(), v.double(), causal=causal)
    ref_lp = reference_linear_attention(q, k, v, causal=causal, upcast=False)
    assert_within_baseline("out", out.detach(), ref_lp.detach(), golden.detach())
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("fmap", ["elu", "relu", "favor+"])
def test_native_cores_equal_the_torch_cores(causal, fmap, monkeypatch, native_build):
    """Both cores in float32 on the same inputs: equal up to float32 rounding of their different summation
    orders (the tolerance rule, with the PyTorch core as the same-dtype baseline against float64), in
    output and every gradient; with GQA, padding, lengths that are not multiples of the native blocks
    (4 rows) and several row chunks of the non-causal states. FAVOR+ at D = 64, F = 100, where some
    features carry a shift c > 0 (see FavorPlus._shift). Built for this CPU and for AVX2."""
    B, Hq, Hkv, N, D, Dv = 2, 6, 2, 301, 20, 33
    if fmap == "favor+":
        D, fmap = 64, FavorPlus(64, 100, seed=3)
        assert bool((fmap._shift(torch.float32, torch.device("cpu")) > 0).any())
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, Dv, seed=4)
    kpm = padding_mask(B, N, all_padded=1)
    g = torch.randn(B, Hq, N, Dv, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fn = lambda a, b, c: sa.linear_attention(a, b, c, feature_map=fmap, causal=causal,  # noqa: E731
                                            key_padding_mask=kpm)
    fast = run_and_grad(fn, q, k, v, g.float())
    golden = run_and_grad(fn, q.double(), k.double(), v.double(), g)  # float64 runs the PyTorch core
    monkeypatch.setattr(linear, "_native_kind", lambda fm, x: None)
    slow = run_and_grad(fn, q, k, v, g.float())
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert not torch.equal(fast[i], slow[i]), f"{name}: the native core did not run"
        assert_within_baseline(name, fast[i], slow[i], golden[i], grad=i > 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_native_cores_keep_their_accuracy_on_long_sequences(causal):
    """FAVOR+'s key features span many orders of magnitude, so summing 16384 keys' state updates one after
    the other loses float32 accuracy (it was 5x the PyTorch core's error at N=20000, 30x at 65536); the
    native cores sum in two levels (see `running` in linear.c) and stay within the tolerance rule with the
    PyTorch core as the float32 baseline, in output and gradients."""
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    N, fm = 16384, FavorPlus(64, 64, seed=0)
    q, k, v = make_qkv(1, 1, 1, N, N, 64, seed=6, dtype=torch.float64)
    g = torch.randn(1, 1, N, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    fn = lambda a, b, c: sa.linear_attention(a, b, c, feature_map=fm, causal=causal)  # noqa: E731
    golden = run_and_grad(fn, q, k, v, g)  # float64 runs the PyTorch core
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    fast = run_and_grad(fn, q32, k32, v32, g.float())
    with pytest.MonkeyPatch.context() as m:
        m.setattr(linear, "_native_kind", lambda f, x: None)
        slow = run_and_grad(fn, q32, k32, v32, g.float())
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_within_baseline(name, fast[i], slow[i], golden[i], grad=i > 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_native_cores_do_not_depend_on_threads(causal):
    """The native non-causal states are summed over a fixed number of row chunks, in order, and the causal
    recurrence runs one key head per thread: one thread and two give identical bits."""
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    q, k, v = make_qkv(1, 4, 2, 1100, 1100, 16, seed=5)
    g = torch.randn(1, 4, 1100, 16, generator=torch.Generator().manual_seed(1))
    fn = lambda a, b, c: sa.linear_attention(a, b, c, causal=causal)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run_and_grad(fn, q, k, v, g)
        torch.set_num_threads(1)
        one = run_and_grad(fn, q, k, v, g)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("out", "dq", "dk", "dv"), one, two, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("fmap", ["elu", "relu"])
def test_non_finite_inputs_propagate_alike(causal, fmap, linear_path):
    """A NaN in a query row makes that row's output NaN (elu(NaN) + 1 and relu(NaN) are NaN); a NaN in a
    key makes every output that sums over it NaN (all rows, or causal rows from that key on); -inf in a
    query is a feature of 0 and an output of 0. Both cores agree."""
    q, k, v = make_qkv(1, 2, 2, 13, 13, 5, requires_grad=False)
    q[0, 0, 3, 1] = float("nan")
    q[0, 0, 4, :] = float("-inf")
    k[0, 1, 6, 2] = float("nan")
    out = sa.linear_attention(q, k, v, feature_map=fmap, causal=causal)
    bad = out.isnan().any(-1)[0]  # (H, N)
    want = torch.zeros(2, 13, dtype=torch.bool)
    want[0, 3] = True
    want[1, 6 if causal else 0:] = True
    assert torch.equal(bad, want), bad
    assert float(out[0, 0, 4].abs().max()) < 1e-20  # features ~0 (native elu: e^-87): output ~0, not NaN


@pytest.mark.parametrize("fmap", ["elu", "relu", "favor+", "callable"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoding_chunk_by_chunk_equals_one_causal_call(fmap, dtype, linear_path):
    """A LinearAttentionState carried over chunks of 1, 2, ... tokens (the first chunk on the causal core,
    the rest as a triangle plus the sums) gives the outputs and gradients of one causal call over the whole
    sequence, with GQA and padding; an empty chunk changes nothing."""
    B, Hq, Hkv, N, D, Dv = 2, 4, 2, 41, 8, 5
    fm = {"favor+": FavorPlus(D, 16, seed=1), "callable": lambda x: torch.sigmoid(x)}.get(fmap, fmap)
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, Dv, dtype=dtype, seed=8)
    kpm = padding_mask(B, N)
    g = torch.randn(B, Hq, N, Dv, dtype=dtype, generator=torch.Generator().manual_seed(9))
    whole = run_and_grad(lambda a, b, c: sa.linear_attention(a, b, c, feature_map=fm, causal=True,
                                                             key_padding_mask=kpm), q, k, v, g)

    def chunked(a, b, c):
        state, outs = linear.LinearAttentionState(), []
        for lo, hi in [(0, 9), (9, 10), (10, 10), (10, 12), (12, 29), (29, 30), (30, 41)]:
            outs.append(sa.linear_attention(a[:, :, lo:hi], b[:, :, lo:hi], c[:, :, lo:hi], feature_map=fm,
                                            causal=True, key_padding_mask=kpm[:, lo:hi], state=state))
        assert state.length == N and state.kvz.shape[:2] == (B, Hkv)
        return torch.cat(outs, 2)

    steps = run_and_grad(chunked, q, k, v, g)
    if dtype == torch.float64:  # the same sums in another order
        for name, a, b in zip(("out", "dq", "dk", "dv"), steps, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        return
    # float32: the tolerance rule, the whole-sequence call as the same-dtype baseline against float64
    golden = run_and_grad(lambda a, b, c: sa.linear_attention(a, b, c, feature_map=fm, causal=True,
                                                              key_padding_mask=kpm),
                          q.double(), k.double(), v.double(), g.double())
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_within_baseline(name, steps[i], whole[i], golden[i], grad=i > 0)


def test_decoding_state_errors_and_reuse():
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, requires_grad=False)
    state = linear.LinearAttentionState()
    with pytest.raises(ValueError, match="causal"):
        sa.linear_attention(q, k, v, state=state)
    with pytest.raises(TypeError, match="state"):
        sa.linear_attention(q, k, v, causal=True, state={})
    sa.linear_attention(q, k, v, causal=True, state=state)
    with pytest.raises(ValueError, match="state holds sums"):  # another batch size
        sa.linear_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                            causal=True, state=state)
    with pytest.raises(ValueError, match="state holds sums"):  # another feature count
        sa.linear_attention(q, k, v, causal=True, feature_map=FavorPlus(4, 9), state=state)
    assert state.detach_().kvz.requires_grad is False and state.length == 6
    state.reset()
    assert state.kvz is None and state.length == 0
    module = sa.nn.LinearAttention(causal=True)
    out = torch.cat([module(q[:, :, :3], k[:, :, :3], v[:, :, :3], state=state),
                     module(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], state=state)], 2)
    torch.testing.assert_close(out, module(q, k, v))


def test_empty_lengths():
    q, k, v = make_qkv(1, 2, 2, 0, 5, 4)
    assert sa.linear_attention(q, k, v).shape == (1, 2, 0, 4)
    q, k, v = make_qkv(1, 2, 2, 3, 0, 4)
    out = sa.linear_attention(q, k, v)
    assert torch.equal(out, torch.zeros(1, 2, 3, 4))


# ----------------------------------------------------------------------------- FAVOR+


def test_favor_estimator_is_unbiased():
    """Averaged over independent draws, φ(q)·φ(k) -> exp(q·k/√D); tolerance from the sample std."""
    D, m, draws = 8, 8, 2000
    g = torch.Generator().manual_seed(0)
    q = 0.7 * torch.randn(5, D, generator=g, dtype=torch.float64)
    k = 0.7 * torch.randn(5, D, generator=g, dtype=torch.float64)
    exact = torch.exp((q * k).sum(-1) / math.sqrt(D))  # (5,) pairs q_i, k_i
    est = torch.stack([
        (lambda fm: (fm.raw(q) * fm.raw(k)).sum(-1))(FavorPlus(D, m, seed=s).double()) for s in range(draws)
    ])  # (draws, 5)
    mean, std = est.mean(0), est.std(0)
    z = (mean - exact).abs() / (std / math.sqrt(draws))
    assert (z < 4.5).all(), f"|mean - exact| / stderr = {z.tolist()}"  # 4.5 sigma: false alarm < 1e-5


def test_favor_error_falls_with_features():
    B, H, N, D = 1, 2, 64, 16
    q, k, v = make_qkv(B, H, H, N, N, D, requires_grad=False)
    q, k = 0.5 * q, 0.5 * k
    exact = sa.reference_attention(q, k, v)
    errs = []
    for m in (8, 32, 128, 512):
        e = [float((sa.linear_attention(q, k, v, feature_map=FavorPlus(D, m, seed=s), eps=0.0) - exact)
                   .pow(2).mean().sqrt()) for s in range(4)]
        errs.append(sum(e) / len(e))
    assert all(a > b for a, b in zip(errs[:-1], errs[1:], strict=True)), f"rmse for F=8,32,128,512: {errs}"
    assert errs[-1] < errs[0] / 4, errs


def test_favor_is_deterministic_and_redraws():
    a, b = FavorPlus(16, 40, seed=3), FavorPlus(16, 40, seed=3)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, FavorPlus(16, 40, seed=4).projection)
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, requires_grad=False)
    assert torch.equal(sa.linear_attention(q, k, v, feature_map=a), sa.linear_attention(q, k, v, feature_map=b))
    before = a.projection.clone()
    a.redraw()
    b.redraw()
    assert not torch.equal(a.projection, before)
    assert torch.equal(a.projection, b.projection)
    fresh = FavorPlus(16, 40, seed=3)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.projection, a.projection)
    # the redraw count is saved too: the loaded module's next redraw is the saved one's
    fresh.redraw()
    a.redraw()
    assert fresh.draws == a.draws == 2 and torch.equal(fresh.projection, a.projection)


def test_favor_orthogonal_blocks():
    w = FavorPlus(8, 20, seed=0).projection.double()
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(feature_map="softmax"), ValueError, "feature_map"),
    (dict(feature_map=3), TypeError, "feature_map"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), TypeError, "chunk_size"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(key_padding_mask=torch.zeros(2, 6)), TypeError, "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(feature_map=FavorPlus(5)), ValueError, "head_dim"),
    (dict(feature_map=lambda x: x.sum(-1)), ValueError, "feature map"),
])
def test_bad_arguments(kwargs, exc, words):
    q, k, v = make_qkv(2, 2, 2, 6, 6, 4, requires_grad=False)
    with pytest.raises(exc, match=words):
        sa.linear_attention(q, k, v, **kwargs)


def test_bad_tensors_and_causal_lengths():
    q, k, v = make_qkv(1, 2, 2, 6, 7, 4, requires_grad=False)
    with pytest.raises(ValueError, match="N == S"):
        sa.linear_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="multiple"):
        sa.linear_attention(torch.randn(1, 3, 6, 4), k, v)
    with pytest.raises(TypeError, match="floating"):
        sa.linear_attention(q.long(), k, v)
    with pytest.raises(ValueError, match="4 dimensions"):
        sa.linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        FavorPlus(0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nothing_kept_for_a_backward_under_no_grad(causal, monkeypatch, torch_path):
    """Inputs that require grad, called under torch.no_grad: no backward can follow, so the cores keep no
    features or chunk states (they are only consulted about it when one can)."""
    calls = []
    monkeypatch.setattr(linear, "_keep_features", lambda *a: calls.append(a) or True)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8)
    with torch.no_grad():
        out = sa.linear_attention(q, k, v, causal=causal, chunk_size=8)
    assert not calls and not out.requires_grad
    sa.linear_attention(q, k, v, causal=causal, chunk_size=8)
    assert calls, "with autograd recording the backward's needs are considered"


def test_features_kept_for_the_backward_only_within_budget():
    """elu/relu features (F = D) are always reused by the backward; FAVOR+'s N × F features only while they
    fit in _KEEP_FEATURES_BYTES, so long sequences stay O(N·D) in memory."""
    q = k = torch.empty(1, 8, 65536, 64, device="meta")
    n = 8 * 2 * 65536
    assert linear._keep_features(q, k, n * 64), "elu at N=65536: features the size of q and k"
    assert not linear._keep_features(q, k, n * 266), "FAVOR+ (F=266) at N=65536: 1.1 GB, recomputed"
    small = torch.empty(1, 8, 4096, 64, device="meta")
    assert linear._keep_features(small, small, 8 * 2 * 4096 * 266), "FAVOR+ at N=4096: 70 MB, kept"
