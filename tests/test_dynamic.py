"""Content-based mechanisms (TopK, ProbSparse) against dense masked attention over the pairs they keep."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_baseline, make_qkv, padding_mask, run_and_grad, use_avx2_build

import sparse_attention as sa
from sparse_attention import native
from sparse_attention.dynamic import (
    LSH,
    ProbSparse,
    Routing,
    TopK,
    explain,
    kept_stats,
    sinkhorn,
    sinkhorn_attention,
    sinkhorn_reference,
    update_centroids,
)
from sparse_attention.dynamic.base import padded, query_heads
from sparse_attention.dynamic.topk import key_window, top_k

SHAPES = [  # B, Hq, Hkv, N, S, D
    (2, 4, 2, 37, 53, 8),
    (1, 2, 1, 97, 97, 16),
    (2, 2, 2, 1, 40, 8),
]


def _ids(s):
    B, Hq, Hkv, N, S, D = s
    return f"B{B}-H{Hq}kv{Hkv}-N{N}-S{S}-D{D}"


def _compare_over_kept(mech, q, k, v, kpm=None, rows=None):
    """Output and gradients equal dense attention over exactly explain()'s pairs (on ``rows`` if given)."""
    kept = explain(q, k, mech, key_padding_mask=kpm)
    g = torch.randn(q.shape[:-1] + v.shape[-1:], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    impl = run_and_grad(lambda a, b, c: sa.attention(a, b, c, mech, key_padding_mask=kpm), q, k, v, g.to(q.dtype))
    golden = run_and_grad(lambda a, b, c: sa.reference_attention(a, b, c, kept), q.double(), k.double(), v.double(),
                          g)
    ref_lp = run_and_grad(lambda a, b, c: sa.reference_attention(a, b, c, kept, upcast=False), q, k, v,
                          g.to(q.dtype))
    if rows is not None:  # forward only, restricted rows (ProbSparse's lazy rows are not attention)
        assert_within_baseline("out", impl[0][rows], ref_lp[0][rows], golden[0][rows])
        return kept
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_within_baseline(name, impl[i], ref_lp[i], golden[i], grad=i > 0, min_len=min(q.shape[2], k.shape[2]))
    return kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("mech", [TopK(5), TopK(5) & sa.Causal(), TopK(3, chunk_size=7) & sa.SlidingWindow(6),
                                  TopK(1000)], ids=repr)
def test_topk_equals_dense_attention_over_kept_pairs(mech, shape, dtype, top_k_path):
    B, Hq, Hkv, N, S, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, dtype=dtype, seed=11)
    kpm = padding_mask(B, S, all_padded=1 if B > 1 else None)
    _compare_over_kept(mech, q, k, v)
    _compare_over_kept(mech, q, k, v, kpm)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["", "dropout"])
@pytest.mark.parametrize("mech", [TopK(5), TopK(4, chunk_size=9) & sa.Causal()], ids=repr)
def test_topk_sparse_products_equal_the_row_gathers(mech, dropout_p, monkeypatch, recwarn):
    """On CPU TopK mixes values and runs its backward as CSR products; in float64 they equal the row-gather
    path (used on other devices) in output and every gradient, with GQA, padding and dropout (same seed)."""
    from sparse_attention.dynamic import topk

    q, k, v = make_qkv(2, 4, 2, 37, 53, 8, 6, dtype=torch.float64, seed=14)
    kpm = padding_mask(2, 53, all_padded=1)
    g = torch.randn(2, 4, 37, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def run(sparse):
        monkeypatch.setattr(topk, "SPARSE_PRODUCTS", sparse)
        torch.manual_seed(5)  # the dropout mask
        return run_and_grad(lambda a, b, c: sa.attention(a, b, c, mech, key_padding_mask=kpm, dropout_p=dropout_p),
                            q, k, v, g)

    for name, x, y in zip(("out", "dq", "dk", "dv"), run(True), run(False), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    assert not [w for w in recwarn if "sparse" in str(w.message).lower()], "the CSR beta warning leaked"


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["", "dropout"])
@pytest.mark.parametrize("mech", [TopK(5), TopK(4, chunk_size=9) & sa.Causal()], ids=repr)
def test_topk_native_backward_within_the_csr_baseline(mech, dropout_p, monkeypatch):
    """The native backward (sparse_attention/native/mix.c, float32 only) against the float64 CSR backward,
    within the tolerance rule whose same-dtype baseline is the float32 CSR backward; with GQA, padding
    and dropout (same seed, so the same mask)."""
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    from sparse_attention.dynamic import topk

    q, k, v = make_qkv(2, 4, 2, 37, 53, 8, 6, seed=15)
    kpm = padding_mask(2, 53, all_padded=1)
    g = torch.randn(2, 4, 37, 6, generator=torch.Generator().manual_seed(2))

    def grads(dtype):
        torch.manual_seed(5)  # the dropout mask
        return run_and_grad(lambda a, b, c: sa.attention(a, b, c, mech, key_padding_mask=kpm, dropout_p=dropout_p),
                            *(t.detach().to(dtype).requires_grad_() for t in (q, k, v)), g.to(dtype))[1:]

    native_fp32 = grads(torch.float32)
    golden = grads(torch.float64)  # float64: the CSR products
    monkeypatch.setattr(topk, "_native_backward", lambda *a: None)
    csr_fp32 = grads(torch.float32)
    for name, x, lp, gold in zip(("dq", "dk", "dv"), native_fp32, csr_fp32, golden, strict=True):
        assert_within_baseline(name, x, lp, gold, grad=True, min_len=37)


def test_topk_double_backward_takes_the_differentiable_path():
    """With create_graph=True the backward must stay differentiable: the native kernels (plain results)
    step aside, whichever inputs require grad (only q and k here once crashed the native backward)."""
    q, k, v = make_qkv(1, 2, 2, 50, 50, 8, seed=3, requires_grad=False)
    q.requires_grad_(), k.requires_grad_()
    gq, = torch.autograd.grad(sa.attention(q, k, v, TopK(5)).sum(), q, create_graph=True)
    assert gq.requires_grad and bool(torch.isfinite(gq).all())
    dk, = torch.autograd.grad(gq.square().sum(), k)  # the second order reaches k
    assert bool(torch.isfinite(dk).all()) and bool(dk.abs().sum() > 0)


@pytest.mark.parametrize("k_top", [1, 4, 17])
def test_topk_keeps_exactly_k_per_row_and_the_best(k_top):
    q, k, _ = make_qkv(2, 2, 2, 33, 29, 8, seed=2, requires_grad=False)
    kept = explain(q, k, TopK(k_top))
    assert torch.equal(kept.sum(-1), torch.full((2, 2, 33), min(k_top, 29))), "not exactly k keys per row"
    scores = q @ k.transpose(-1, -2)
    worst_kept = scores.masked_fill(~kept, float("inf")).amin(-1)
    best_dropped = scores.masked_fill(kept, float("-inf")).amax(-1)
    assert bool((worst_kept >= best_dropped).all()), "a dropped key scores higher than a kept one"


@pytest.fixture(params=["native", "native-avx2", "torch"])
def top_k_path(request, monkeypatch, tmp_path_factory):
    """The native kernels (built for this CPU, or rebuilt for AVX2 as on CI machines without AVX-512), or
    the PyTorch ops they replace (the path without a compiler): top_k, the stable orders, LSH's buckets,
    TopK's value mixing and backward, and routing's pair counts, row scatters and items kernels."""
    if request.param.startswith("native"):
        if request.param == "native-avx2":
            use_avx2_build(monkeypatch, tmp_path_factory)
        if not native.available():
            pytest.skip(f"native kernels unavailable: {native.status()}")
    else:
        monkeypatch.setattr(native, "topk_rows", lambda s, k: None)
        monkeypatch.setattr(native, "bucket_order", lambda ids, values: None)
        monkeypatch.setattr(native, "lsh_buckets", lambda p: None)
        monkeypatch.setattr(native, "mix_rows", lambda w, cols, v: None)
        monkeypatch.setattr(native, "dot_rows", lambda a, cols, b: None)
        monkeypatch.setattr(native, "pair_counts", lambda qi, ki, N, S, neg_log=False: None)
        monkeypatch.setattr(native, "scatter_groups", lambda w, cols, src, groups, keys: None)
        monkeypatch.setattr(native, "items_forward", lambda *args: None)
        monkeypatch.setattr(native, "items_backward", lambda *args: None)
    return request.param


@pytest.mark.parametrize("S", [16, 63, 64, 257, 1000, 4099])
@pytest.mark.parametrize("k_top", [1, 3, 16, 40])
@pytest.mark.parametrize("data", ["randn", "ties", "masked", "nan"])
def test_top_k_selection_equals_torch_topk(S, k_top, data, top_k_path):
    """top_k (native, or torch.topk in one or two levels depending on S / k) returns torch.topk's values,
    at distinct indices that hold them, including rows with many equal scores, rows with fewer than k
    finite entries, and NaN scores (which torch.topk ranks above every number); by_column=True puts
    each row in ascending column order."""
    if k_top > S:
        pytest.skip("k <= S")
    gen = torch.Generator().manual_seed(S * 100 + k_top)
    s = torch.randn(3, 5, S, generator=gen)
    if data == "ties":
        s = torch.randint(0, 4, (3, 5, S), generator=gen).float()
    if data == "masked":  # row 0: nothing allowed, row 1: fewer than k allowed, the rest: about half
        s = s.masked_fill(torch.rand(3, 5, S, generator=gen) < 0.5, float("-inf"))
        s[:, 0] = float("-inf")
        s[:, 1] = float("-inf")
        s[:, 1, ::max(1, S // max(1, k_top - 1))] = 1.0
    if data == "nan":  # a few NaN per row in rows 0-1, none elsewhere
        s[:, :2, torch.randint(0, S, (3,), generator=gen)] = float("nan")
    values, idx = top_k(s, k_top)
    want = s.topk(k_top, dim=-1).values
    got = values.sort(-1, descending=True).values  # (sort also ranks NaN first)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg="not the k largest values")
    torch.testing.assert_close(s.gather(-1, idx), values, rtol=0, atol=0, equal_nan=True,
                               msg="indices do not hold the values")
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all()), "an index is repeated"
    values_c, idx_c = top_k(s, k_top, by_column=True)
    assert bool((idx_c.diff(dim=-1) > 0).all()), "by_column: not in ascending column order"
    torch.testing.assert_close(s.gather(-1, idx_c), values_c, rtol=0, atol=0, equal_nan=True,
                               msg="by_column: indices do not hold the values")


def test_top_k_on_strided_rows_and_k_zero(top_k_path):
    s = torch.randn(4, 3000, generator=torch.Generator().manual_seed(1))
    t = s.t().contiguous().t()  # the same values, column-major
    assert not t.is_contiguous()
    torch.testing.assert_close(top_k(t, 20)[0].sort(-1).values, s.topk(20).values.sort(-1).values, rtol=0, atol=0)
    values, idx = top_k(s, 0)
    assert values.shape == idx.shape == (4, 0)


def test_padded_pads_only_when_asked():
    """padded() is F.pad, except that padding by nothing returns the tensor itself (F.pad would copy it,
    and its backward would copy the gradient)."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    assert padded(x, (0, 0, 0, 0)) is x
    want = torch.nn.functional.pad(x, (0, 2, 0, 1), value=-1.0)
    torch.testing.assert_close(padded(x, (0, 2, 0, 1), value=-1.0), want, rtol=0, atol=0)


def test_query_heads_repeats_only_for_grouped_heads():
    """query_heads: query head h reads key/value head h // (Hq // Hkv) (repeat_interleave, not tile); the
    tensor itself when Hq == Hkv."""
    x = torch.randn(2, 2, 5, 3)
    assert query_heads(x, 2) is x
    y = query_heads(x, 6)
    assert y.shape == (2, 6, 5, 3)
    for h in range(6):
        assert torch.equal(y[:, h], x[:, h // 3])


def test_topk_with_restriction_keeps_fewer_when_fewer_allowed():
    q, k, _ = make_qkv(1, 1, 1, 20, 20, 4, seed=1, requires_grad=False)
    kept = explain(q, k, TopK(6) & sa.Causal())
    allowed = sa.Causal().mask(20, 20)
    assert not bool((kept & ~allowed).any()), "kept a pair outside the restriction"
    assert torch.equal(kept.sum(-1)[0, 0], allowed.sum(-1).clamp(max=6))


@pytest.mark.parametrize("restrict, N, S", [(sa.Causal(), 70, 70), (sa.Causal(), 40, 90), (sa.Causal(), 90, 40),
                                             (sa.SlidingWindow(6), 70, 70), (sa.SlidingWindow(3, causal=True), 50, 61)],
                         ids=["causal", "causal-N40-S90", "causal-N90-S40", "window6", "causal-window3"])
@pytest.mark.parametrize("chunk", [None, 1, 9])
@pytest.mark.parametrize("padded", [False, True], ids=["", "padding"])
def test_restricted_topk_keeps_the_best_allowed_keys(restrict, N, S, chunk, padded, top_k_path):
    """TopK & pattern scores only a window of keys per chunk (key_window): every row still keeps its
    min(k, allowed) best allowed keys, against dense scores masked by the restriction (random scores:
    no ties)."""
    q, k, _ = make_qkv(2, 2, 1, N, S, 8, seed=N + S, requires_grad=False)
    kpm = padding_mask(2, S, all_padded=1) if padded else None
    kept = explain(q, k, TopK(5, chunk_size=chunk) & restrict, key_padding_mask=kpm)
    allowed = restrict.mask(N, S).view(1, 1, N, S).expand(2, 2, N, S)
    if kpm is not None:
        allowed = allowed & ~kpm.view(2, 1, 1, S)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    best = scores.topk(5, dim=-1)
    want = torch.zeros_like(kept).scatter_(-1, best.indices, ~torch.isneginf(best.values))
    assert torch.equal(kept, want), f"rows differ: {(kept != want).any(-1).nonzero().tolist()[:5]}"


def test_key_window():
    """The keys a chunk scores: the allowed ones, widened to k, and the part that needs the mask."""
    causal = sa.Causal().mask(8, 8)
    assert key_window(causal[4:8], 2) == (0, 8, (5, 8))  # the docstring's picture
    assert key_window(causal[0:2], 2) == (0, 2, (1, 2))
    assert key_window(causal[0:2], 5) == (0, 5, (1, 5)), "widened to k keys"
    assert key_window(torch.ones(3, 8, dtype=torch.bool), 4) == (0, 8, None), "nothing to mask"
    assert key_window(torch.zeros(3, 8, dtype=torch.bool), 4) == (0, 4, (0, 4)), "nothing allowed"
    band = torch.zeros(2, 10, dtype=torch.bool)
    band[0, 6:9] = band[1, 7:10] = True
    assert key_window(band, 2) == (6, 10, (6, 10))
    assert key_window(band, 6) == (4, 10, (4, 10)), "widened towards the start at the end of the keys"
    assert key_window(band.view(1, 1, 2, 10).expand(3, 2, 2, 10), 2) == (6, 10, (6, 10)), "batch and heads"


def test_topk_large_k_equals_full_attention():
    q, k, v = make_qkv(2, 2, 1, 31, 45, 8, seed=5, requires_grad=False)
    torch.testing.assert_close(sa.attention(q, k, v, TopK(45)), sa.attention(q, k, v), atol=2e-6, rtol=2e-6)


def test_topk_chunking_does_not_change_the_result():
    """Same selection, and the same values up to float32 rounding (matmuls of other shapes round differently)."""
    q, k, v = make_qkv(1, 2, 2, 50, 50, 8, seed=6)
    assert torch.equal(explain(q, k, TopK(7)), explain(q, k, TopK(7, chunk_size=3)))
    g = torch.randn(1, 2, 50, 8, generator=torch.Generator().manual_seed(0))
    a = run_and_grad(lambda x, y, z: sa.attention(x, y, z, TopK(7)), q, k, v, g)
    b = run_and_grad(lambda x, y, z: sa.attention(x, y, z, TopK(7, chunk_size=3)), q, k, v, g)
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b, strict=True):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_causal_topk_never_looks_at_future_keys():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, seed=7, requires_grad=False)
    mech = TopK(4) & sa.Causal()
    base = sa.attention(q, k, v, mech)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] = torch.randn_like(k2[:, :, 25:]) * 10
    v2[:, :, 25:] = torch.randn_like(v2[:, :, 25:]) * 10
    assert torch.equal(sa.attention(q, k2, v2, mech)[:, :, :25], base[:, :, :25])


def test_topk_gradcheck_fp64():
    q, k, v = make_qkv(1, 2, 1, 6, 7, 3, dtype=torch.float64, seed=21)
    assert torch.autograd.gradcheck(lambda a, b, c: sa.attention(a, b, c, TopK(3) & sa.Causal()), (q, k, v))


# --- ProbSparse ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_ids)
def test_probsparse_active_rows_are_attention_and_lazy_rows_the_mean(shape, causal):
    B, Hq, Hkv, N, S, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, seed=12)
    mech = ProbSparse(2, causal=causal)
    kept = explain(q, k, mech)
    active = kept.any(-1)
    assert int(active[0, 0].sum()) == min(N, mech.num_active(N)) or causal, "not u active queries"
    _compare_over_kept(mech, q, k, v, rows=active)
    out = sa.attention(q, k, v, mech)
    lazy = mech.lazy_output(v, N, None, Hq)
    torch.testing.assert_close(out[~active], lazy[~active].to(out.dtype), atol=1e-6, rtol=1e-6)
    if causal:  # the running mean of the keys up to each query's position
        pos = torch.arange(N) + (S - N)
        running = torch.stack([v[:, :, : p + 1].mean(2) for p in pos.tolist()], 2).repeat_interleave(Hq // Hkv, 1)
        torch.testing.assert_close(lazy, running.to(lazy.dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_probsparse_with_every_query_active_is_full_attention(causal):
    q, k, v = make_qkv(2, 2, 2, 30, 30, 8, seed=13, requires_grad=False)
    mech = ProbSparse(50, causal=causal)
    assert mech.num_active(30) == 30
    expected = sa.attention(q, k, v, sa.Causal() if causal else None)
    torch.testing.assert_close(sa.attention(q, k, v, mech), expected, atol=2e-6, rtol=2e-6)


def test_probsparse_is_deterministic_for_a_seed():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8, seed=14, requires_grad=False)
    a = sa.attention(q, k, v, ProbSparse(1, seed=3))
    assert torch.equal(a, sa.attention(q, k, v, ProbSparse(1, seed=3)))
    assert torch.equal(explain(q, k, ProbSparse(1, seed=3)), explain(q, k, ProbSparse(1, seed=3)))


def test_probsparse_gradients_match_reference_pieces():
    """Gradients flow through the active rows' attention and the lazy rows' mean of V."""
    q, k, v = make_qkv(1, 2, 2, 24, 24, 4, dtype=torch.float64, seed=15)
    mech = ProbSparse(1.5)
    assert torch.autograd.gradcheck(lambda a, b, c: sa.attention(a, b, c, mech), (q, k, v))


# --- LSH ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 2, 1, 50, 20, 8)], ids=_ids)
@pytest.mark.parametrize("mech", [LSH(8), LSH(8, n_hashes=3), LSH(8, n_hashes=2, causal=True),
                                  LSH(5, n_hashes=4, n_buckets=4)], ids=repr)
def test_lsh_equals_dense_attention_over_the_union_of_rounds(mech, shape, dtype):
    B, Hq, Hkv, N, S, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, dtype=dtype, seed=17)
    _compare_over_kept(mech, q, k, v)
    _compare_over_kept(mech, q, k, v, padding_mask(B, S))


@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("exclude_self", [False, True], ids=["", "shared-qk"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "kpm"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 130, 130, 8, 5), (1, 2, 1, 64, 90, 8, 8), (2, 2, 2, 37, 37, 4, 4)],
                         ids=lambda s: "B{}-H{}/{}-N{}-S{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("rounds", [1, 3])
def test_lsh_fused_kernel_path_equals_the_plain_path(shape, causal, exclude_self, masked, rounds):
    """The rounds run on the fused CPU kernel (sorted chunks as items, key windows as strided views, several
    rounds merged through their log-sum-exps); in float64 its output and gradients equal the plain-op path."""
    B, Hq, Hkv, N, S, D, Dv = shape
    if exclude_self and N != S:
        pytest.skip("shared-QK needs N == S")
    mech = LSH(16, n_hashes=rounds, seed=1, causal=causal, exclude_self=exclude_self, shared_qk=exclude_self)
    kpm = padding_mask(B, S) if masked else None
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, Dv, dtype=torch.float64)
    g = torch.randn(B, Hq, N, Dv, dtype=torch.float64)

    def plain(a, b, c):
        qo, ko, qc, kc, C, ks = mech._chunks(a, b, kpm)
        return mech._attend_math(a, b, c, qo, ko, qc, kc, C, ks, kpm, D**-0.5, 0.0)

    fused = run_and_grad(lambda a, b, c: mech.attend(a, b, c, key_padding_mask=kpm, scale=D**-0.5, dropout_p=0.0),
                         q, k, v, g)
    for name, x, y in zip(("out", "dq", "dk", "dv"), fused, run_and_grad(plain, q, k, v, g), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def _native_and_kernel_runs(fn, q, k, v, g, monkeypatch):
    """fn's output and gradients (float32) on the native items kernels, checked to run, then on the fused
    kernel (the native kernels patched out)."""
    calls = []
    for name in ("items_forward", "items_backward"):
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, n=name, f=kernel: calls.append(n) or f(*a))
    native_run = run_and_grad(fn, *(t.float() for t in (q, k, v)), g.float())
    assert calls == ["items_forward", "items_backward"], f"the native kernels did not both run: {calls}"
    for name in ("items_forward", "items_backward"):
        monkeypatch.setattr(native, name, lambda *a: None)
    return native_run, run_and_grad(fn, *(t.float() for t in (q, k, v)), g.float())


def _assert_padded_keys_get_no_gradient(kpm, dk, dv):
    """Padded keys are in no pair: their dK and dV rows are exactly 0."""
    for name, grad in (("dk", dk), ("dv", dv)):
        pad = kpm[:, None, :, None].expand_as(grad)
        assert torch.equal(grad[pad], torch.zeros_like(grad[pad])), f"{name}: nonzero at a padded key"


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("exclude_self", [False, True], ids=["", "shared-qk"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "kpm"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 130, 130, 13, 5), (1, 2, 1, 64, 90, 8, 8), (1, 2, 2, 256, 256, 64, 64)],
                         ids=lambda s: "B{}-H{}/{}-N{}-S{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("rounds", [1, 3])
def test_lsh_native_items_match_the_fused_kernel(shape, causal, exclude_self, masked, rounds, monkeypatch,
                                                 native_build):
    """float32: the rounds on the native items kernels (chunks against their key windows, rows read and results
    added by index, GQA heads grouped by key/value head) against the fused kernel path, both against the
    float64 plain path by the tolerance rule; padded keys get exactly zero dK and dV."""
    B, Hq, Hkv, N, S, D, Dv = shape
    if exclude_self and N != S:
        pytest.skip("shared-QK needs N == S")
    mech = LSH(16, n_hashes=rounds, seed=1, causal=causal, exclude_self=exclude_self, shared_qk=exclude_self)
    kpm = padding_mask(B, S) if masked else None
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, Dv, dtype=torch.float64, requires_grad=False)
    g = torch.randn(B, Hq, N, Dv, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def fused(a, b, c):
        return mech.attend(a, b, c, key_padding_mask=kpm, scale=D**-0.5, dropout_p=0.0)

    def plain(a, b, c):
        qo, ko, qc, kc, C, ks = mech._chunks(a, b, kpm)
        return mech._attend_math(a, b, c, qo, ko, qc, kc, C, ks, kpm, D**-0.5, 0.0)

    native_run, kernel_run = _native_and_kernel_runs(fused, q, k, v, g, monkeypatch)
    golden = run_and_grad(plain, q, k, v, g)
    for name, impl, ref, gold in zip(("out", "dq", "dk", "dv"), native_run, kernel_run, golden, strict=True):
        assert_within_baseline(name, impl, ref, gold, grad=name != "out")
    if kpm is not None:
        _assert_padded_keys_get_no_gradient(kpm, *native_run[2:])


@pytest.mark.parametrize("kw", [{}, {"n_hashes": 3}, {"shared_qk": True}, {"causal": True, "n_buckets": 6}],
                         ids=["one-round", "three-rounds", "shared-qk", "causal"])
def test_lsh_native_hashing_equals_the_torch_path(kw, monkeypatch):
    """Buckets and sort orders from sparse_attention.native equal those of the PyTorch ops it replaces
    (abs().argmax(), torch.sort), with GQA and padding; the rest of LSH's tests then cover both."""
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    q, k, _ = make_qkv(2, 4, 2, 75, 75, 8, seed=3, requires_grad=False)
    kpm = padding_mask(2, 75)
    mech = LSH(bucket_size=8, seed=1, **kw)
    fast = mech._chunks(q, k, kpm)
    monkeypatch.setattr(native, "lsh_buckets", lambda p: None)
    monkeypatch.setattr(native, "bucket_order", lambda b, values: None)
    slow = mech._chunks(q, k, kpm)
    for name, a, b in zip(("q_order", "k_order", "q_chunk", "k_chunk", "C", "ks"), fast, slow, strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), name


def test_lsh_hashes_in_row_chunks(monkeypatch):
    """Hashing is chunked over rows (the default bucket count grows with L); any chunking gives the same ids."""
    from sparse_attention.dynamic import lsh

    x, rot = torch.randn(2, 3, 100, 16), torch.randn(2, 16, 40)
    whole = LSH.hash(x, rot)
    proj = torch.einsum("bhld,rdk->rbhlk", x, rot)
    assert torch.equal(whole, torch.cat([proj, -proj], -1).argmax(-1)), "the definition: argmax over [xR, -xR]"
    monkeypatch.setattr(lsh, "HASH_CHUNK_ELEMENTS", 40 * 7)  # 7 rows per chunk
    assert torch.equal(LSH.hash(x, rot), whole)
    assert torch.equal(LSH.hash(x.transpose(1, 2).contiguous().transpose(1, 2), rot), whole), "strided input"


def test_lsh_union_grows_with_rounds_and_one_chunk_is_full_attention():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8, seed=18, requires_grad=False)
    one, three = explain(q, k, LSH(8, n_hashes=1, seed=4)), explain(q, k, LSH(8, n_hashes=3, seed=4))
    assert not bool((one & ~three).any()), "round 1's pairs must be in the 3-round union (same seed)"
    assert int(three.sum()) > int(one.sum())
    assert bool(explain(q, k, LSH(64)).all()), "bucket_size >= N is one chunk: every pair"
    torch.testing.assert_close(sa.attention(q, k, v, LSH(64)), sa.attention(q, k, v), atol=2e-6, rtol=2e-6)


def test_causal_lsh_never_looks_at_future_keys_and_is_deterministic():
    """No future pair is kept and future values never matter (future keys move chunk boundaries, as in Reformer)."""
    q, k, v = make_qkv(1, 2, 2, 48, 48, 8, seed=19, requires_grad=False)
    mech = LSH(6, n_hashes=2, causal=True, seed=1)
    assert not bool((explain(q, k, mech) & ~sa.Causal().mask(48, 48)).any()), "kept a future key"
    base = sa.attention(q, k, v, mech)
    assert torch.equal(base, sa.attention(q, k, v, LSH(6, n_hashes=2, causal=True, seed=1)))
    v2 = v.clone()
    v2[:, :, 30:] += 5.0  # values only: hashing depends on q, k
    assert torch.equal(sa.attention(q, k, v2, mech)[:, :, :30], base[:, :, :30])


@pytest.mark.parametrize("mech", [LSH(4, exclude_self=True), LSH(4, n_hashes=3, exclude_self=True, causal=True)],
                         ids=repr)
def test_lsh_shared_qk_excludes_self_unless_alone(mech):
    q, _, v = make_qkv(2, 2, 2, 40, 40, 8, dtype=torch.float64, seed=20)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1, 5:] = True  # most keys padded: some rows are left with themselves only
    for pad in (None, kpm):
        kept = _compare_over_kept(mech, q, q, v, pad)
        diag = kept.diagonal(dim1=-2, dim2=-1)
        others = (kept & ~torch.eye(40, dtype=torch.bool)).any(-1)
        assert not bool((diag & others).any()), "self kept although the row has another key"
        assert bool((diag | others | ~kept.any(-1)).all())
    with pytest.raises(ValueError, match="exclude_self"):
        sa.attention(q, q[:, :, :30], v[:, :, :30], mech)
    with pytest.raises(ValueError, match="shared_qk"):
        sa.attention(q, q[:, :, :30], v[:, :, :30], LSH(4, shared_qk=True))


def test_lsh_shared_qk_buckets_queries_by_their_keys():
    """shared_qk hashes the keys only; the queries take the buckets of the keys at their positions."""
    q, k, v = make_qkv(2, 4, 2, 40, 40, 8, dtype=torch.float64, seed=21)
    kpm = padding_mask(2, 40)
    for pad in (None, kpm):
        shared = LSH(4, n_hashes=2, seed=5, shared_qk=True)
        kept = _compare_over_kept(shared, q, k, v, pad)
        # the same as hashing the queries when they are the keys (repeated to the query heads)
        kx = k.repeat_interleave(2, dim=1)
        assert torch.equal(kept, explain(kx, k, LSH(4, n_hashes=2, seed=5), key_padding_mask=pad))
        assert not torch.equal(kept, explain(q, k, LSH(4, n_hashes=2, seed=5), key_padding_mask=pad))


# --- Routing ------------------------------------------------------------------------------


def _centroids(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 2, 1, 50, 20, 8)], ids=_ids)
@pytest.mark.parametrize("make", [lambda H, D: Routing(_centroids((4, D))),
                                  lambda H, D: Routing(_centroids((H, 3, D)), causal=True),
                                  lambda H, D: Routing(_centroids((5, D)), capacity=20)],
                         ids=["shared-K4", "per-head-causal", "capacity20"])
def test_routing_equals_dense_attention_over_cluster_pairs(make, shape, dtype, top_k_path):
    B, Hq, Hkv, N, S, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, dtype=dtype, seed=23)
    mech = make(Hq, D)
    _compare_over_kept(mech, q, k, v)
    _compare_over_kept(mech, q, k, v, padding_mask(B, S))


def test_routing_single_cluster_is_full_attention_and_pairs_follow_clusters():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, seed=24, requires_grad=False)
    torch.testing.assert_close(sa.attention(q, k, v, Routing(_centroids((1, 8)))), sa.attention(q, k, v),
                               atol=2e-6, rtol=2e-6)
    mech = Routing(_centroids((4, 8), seed=2))
    kept = explain(q, k, mech)
    qi, ki, _ = mech._route(q, k)
    assert qi.shape == (1, 2, 4, 10), "each centroid takes capacity = ceil(40 / 4) queries"
    # each centroid's members are its 10 most cosine-similar tokens
    c = torch.nn.functional.normalize(mech.centroids, dim=-1)
    for x, idx in ((q, qi), (k, ki)):
        sim = torch.nn.functional.normalize(x, dim=-1) @ c.T  # (1, 2, 40, 4)
        assert torch.equal(idx.sort(-1).values, sim.topk(10, dim=2).indices.transpose(-1, -2).sort(-1).values)
    qm = torch.zeros(1, 2, 40, 4).scatter_(2, qi.transpose(-1, -2), 1.0)
    km = torch.zeros(1, 2, 40, 4).scatter_(2, ki.transpose(-1, -2), 1.0)
    assert torch.equal(kept, (qm @ km.transpose(-1, -2)) > 0), "kept: the pairs sharing a cluster"


def test_routing_pair_counts_in_blocks_of_clusters(monkeypatch, top_k_path):
    """A pair's count is the number of clusters holding both tokens, whatever the block of clusters; its
    bias is -log(count), within one float32 rounding of the log."""
    from sparse_attention.dynamic import routing

    mech = Routing(_centroids((6, 8), seed=3), capacity=12)  # 72 slots for 30 tokens: many shared pairs
    q, k, _ = make_qkv(2, 2, 2, 30, 30, 8, seed=25, requires_grad=False)
    qi, ki, _ = mech._route(q, k)
    qm = torch.zeros(2, 2, 30, 6).scatter_(2, qi.transpose(-1, -2), 1.0)
    km = torch.zeros(2, 2, 30, 6).scatter_(2, ki.transpose(-1, -2), 1.0)
    both = qm @ km.transpose(-1, -2)  # (2, 2, 30, 30) clusters shared by each pair
    expected = torch.stack([both[b, h][qi[b, h, c]][:, ki[b, h, c]] for b in range(2) for h in range(2)
                            for c in range(6)]).view(2, 2, 6, 12, 12)
    assert int(expected.max()) > 1, "the case must have pairs in several clusters"
    for elements in (routing.SIM_CHUNK_ELEMENTS, 1):  # all clusters at once, then one at a time
        monkeypatch.setattr(routing, "SIM_CHUNK_ELEMENTS", elements)
        assert torch.equal(routing._pair_counts(qi, ki, 30, 30, torch.float32), expected)
        torch.testing.assert_close(routing._pair_counts(qi, ki, 30, 30, torch.float32, neg_log=True),
                                   -expected.double().log().float(), rtol=2**-23, atol=0)
        assert torch.equal(mech._route(q, k)[0], qi)


def test_update_centroids_moves_towards_assigned_tokens():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[[[2.0, 0.2], [3.0, -0.2]]]])  # both nearest to centroid 0
    new = update_centroids(c, x, decay=0.5)
    assert torch.equal(new[1], c[1]), "a centroid with no token must not move"
    torch.testing.assert_close(new[0], 0.5 * c[0] + 0.5 * torch.nn.functional.normalize(x[0, 0], dim=-1).mean(0))
    with pytest.raises(ValueError, match="decay"):
        update_centroids(c, x, decay=1.0)


# --- Sinkhorn -----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize(("N", "block"), [(23, 5), (16, 4), (7, 8)])
def test_sinkhorn_attention_equals_the_loop_reference(N, block, hard, causal):
    B, H, D = 2, 2, 4
    q, k, v = make_qkv(B, H, H, N, N, D, dtype=torch.float64, seed=31)
    nb = -(-N // block)
    logits = torch.randn(B, H, nb, nb, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                         requires_grad=True)
    kpm = padding_mask(B, N)
    p = sinkhorn(logits, 10, hard=hard, causal=causal)
    g = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = sinkhorn_attention(q, k, v, p, block=block, causal=causal, key_padding_mask=kpm)
    ref = sinkhorn_reference(q, k, v, p, block=block, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if not hard:  # gradients reach q, k, v and the sorting scores
        grads = torch.autograd.grad(out, (q, k, v, logits), g, retain_graph=True, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, (q, k, v, logits), g, allow_unused=True)
        for name, a, b, x in zip(("dq", "dk", "dv", "dlogits"), grads, ref_grads, (q, k, v, logits), strict=True):
            # one causal block has no sorted block: the scores get no (None) or a zero gradient
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros_like(x) if b is None else b
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("N", "block"), [(23, 5), (130, 64)])
def test_sinkhorn_float32_matches_the_reference(N, block, causal, monkeypatch):
    """float32 (the native items kernels where built) against the fp64 loop reference by the tolerance rule,
    output and the gradients of q, k, v and the sorting scores; the baseline is the same call on plain
    float32 ops (the path non-finite inputs take)."""
    from sparse_attention.engine import blocksparse

    B, H, D = 2, 2, 16
    q, k, v = make_qkv(B, H, H, N, N, D, dtype=torch.float64, seed=34)
    nb = -(-N // block)
    logits = torch.randn(B, H, nb, nb, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kpm = padding_mask(B, N)
    g = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def run(fn, dtype):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, logits)]
        out = fn(*x[:3], sinkhorn(x[3], 8, causal=causal), block=block, causal=causal, key_padding_mask=kpm)
        return [out.detach(), *(torch.zeros_like(t) if d is None else d for d, t in
                                zip(torch.autograd.grad(out, x, g.to(dtype), allow_unused=True), x, strict=True))]

    golden = run(sinkhorn_reference, torch.float64)
    impl = run(sinkhorn_attention, torch.float32)
    monkeypatch.setattr(blocksparse, "all_finite", lambda *t: False)
    baseline = run(sinkhorn_attention, torch.float32)
    for i, name in enumerate(("out", "dq", "dk", "dv", "dlogits")):
        assert_within_baseline(name, impl[i], baseline[i], golden[i], grad=i > 0, min_len=block)


def _unrolled_sinkhorn(x, n_iters=4, temperature=0.6):
    x = x / temperature
    for _ in range(n_iters):
        x = x - torch.logsumexp(x, -1, keepdim=True)
        x = x - torch.logsumexp(x, -2, keepdim=True)
    return torch.exp(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_hard_sinkhorn_sorts_by_copies_exactly(causal, dtype):
    """A hard permutation (zeros and ones, at most one 1 per row; causal: block 0's row is empty) sorts the
    blocks by copies, bit for bit what the product with P gives (that path is taken when P itself needs a
    gradient), output and the gradients of q, k, v; a NaN in one block's keys then reaches only the query
    blocks that read that block (its own, and the one P sorts it to)."""
    from sparse_attention.dynamic.sinkhorn import _hard_sources

    B, H, N, block, D = 2, 2, 26, 4, 8
    nb = -(-N // block)
    q, k, v = make_qkv(B, H, H, N, N, D, dtype=dtype, seed=35)
    p = sinkhorn(torch.randn(B, H, nb, nb, generator=torch.Generator().manual_seed(7), dtype=dtype), 8,
                 hard=True, causal=causal)
    assert _hard_sources(p) is not None and _hard_sources(sinkhorn(p + 0.5, 8)) is None
    assert _hard_sources(p.clone().requires_grad_()) is None, "a P that needs a gradient is multiplied"
    kpm = padding_mask(B, N)
    g = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(8), dtype=dtype)
    runs = []
    for perm in (p, p.clone().requires_grad_()):
        out = sinkhorn_attention(q, k, v, perm, block=block, causal=causal, key_padding_mask=kpm)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs, strict=True):
        assert torch.equal(a, b), f"{name}: copies and the product differ"
    with torch.no_grad():
        k_nan = k.detach().clone()
        k_nan[:, :, 2 * block] = float("nan")  # block 2
        out = sinkhorn_attention(q.detach(), k_nan, v.detach(), p, block=block, causal=causal)
        reads = torch.zeros(B, H, nb, dtype=torch.bool)
        reads[:, :, 2] = True
        reads |= p[..., 2] > 0  # the query blocks whose sorted block is block 2
        full = N // block  # whole blocks (the last one is cut short)
        rows = out.isnan().any(-1)[..., :full * block].view(B, H, full, block)
        assert reads[..., :full].any() and not reads[..., :full].all()
        assert torch.equal(rows.all(-1), reads[..., :full]) and torch.equal(rows.any(-1), reads[..., :full])


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_padded_keys_and_values_change_nothing(hard, causal):
    """Whatever lies at padded positions (large values, inf, NaN) changes neither the output nor any gradient:
    padded keys and values take no part in the sorted blocks (soft sorting mixes whole blocks) and are
    never attended in their own block. Padded keys and values get gradient 0."""
    B, H, N, block, D = 2, 2, 23, 4, 8
    nb = -(-N // block)
    q, k, v = make_qkv(B, H, H, N, N, D, dtype=torch.float32, seed=36, requires_grad=False)
    kpm = padding_mask(B, N)
    kpm[0, 9:13] = True  # a whole block of the first entry too
    logits = torch.randn(B, H, nb, nb, generator=torch.Generator().manual_seed(9), requires_grad=True)
    g = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(10))

    def run(kx, vx):
        x = [t.clone().requires_grad_() for t in (q, kx, vx)]
        p = sinkhorn(logits, 8, hard=hard, causal=causal)
        out = sinkhorn_attention(*x, p, block=block, causal=causal, key_padding_mask=kpm)
        grads = torch.autograd.grad(out, [*x] + ([] if hard else [logits]), g)
        return out, grads

    base = run(k, v)
    pad = kpm[:, None, :, None].expand_as(k)
    for junk in (1e30, float("inf"), float("nan")):
        got = run(torch.where(pad, junk, k), torch.where(pad, -junk, v))
        assert torch.equal(got[0], base[0]), f"output changed with {junk} at padded positions"
        for name, a, b in zip(("dq", "dk", "dv", "dlogits")[:len(base[1])], got[1], base[1], strict=True):
            assert torch.equal(a, b), f"{name} changed with {junk} at padded positions"
    for name, d in zip(("dk", "dv"), base[1][1:3], strict=True):
        assert torch.equal(d[pad], torch.zeros_like(d[pad])), f"{name}: padded positions get gradient 0"


@pytest.mark.parametrize("hard", [False, True])
def test_sinkhorn_empty_batch_and_heads(hard):
    """No batch entry, or no head: an empty output, and gradient 0 for every input (module and function)."""
    for B, H in ((0, 2), (2, 0)):
        q, k, v = (torch.randn(B, H, 7, 4, requires_grad=True) for _ in range(3))
        p = sinkhorn(torch.randn(B, H, 3, 3), 3, hard=hard)
        out = sinkhorn_attention(q, k, v, p, block=3)
        assert out.shape == (B, H, 7, 4)
        assert all(torch.equal(d, torch.zeros_like(d)) for d in torch.autograd.grad(out.sum(), (q, k, v)))
    mod = sa.nn.SinkhornAttention(4, 2, 3).train(not hard)
    q, k, v = (torch.randn(0, 2, 7, 4, requires_grad=True) for _ in range(3))
    out = mod(q, k, v)
    out.sum().backward()
    assert out.shape == (0, 2, 7, 4) and q.grad.shape == q.shape


def test_sinkhorn_gradient_is_the_unrolled_iterations():
    """sinkhorn's own backward (recomputed half-steps) against autograd through the unrolled log-space
    iterations, first and second order; gradcheck and gradgradcheck in float64."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    p, want = sinkhorn(logits, 4, temperature=0.6), _unrolled_sinkhorn(logits)
    torch.testing.assert_close(p, want, atol=1e-14, rtol=1e-14)
    (d1,) = torch.autograd.grad(p, logits, g, create_graph=True)
    (w1,) = torch.autograd.grad(want, logits, g, create_graph=True)
    torch.testing.assert_close(d1, w1, atol=1e-12, rtol=1e-12)
    (d2,) = torch.autograd.grad((d1 * g).sum(), logits)
    (w2,) = torch.autograd.grad((w1 * g).sum(), logits)
    torch.testing.assert_close(d2, w2, atol=1e-11, rtol=1e-11)
    x = torch.randn(1, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: sinkhorn(t, 3), (x,))


def test_sinkhorn_empty_row_is_sinkhorn_of_the_rest():
    """A row of -inf scores stays empty (probability 0, gradient 0, no NaN anywhere): the other rows get
    exactly the iterations on the matrix without that row, value and gradient. (Autograd through the
    iterations gives NaN gradients everywhere here: logsumexp's backward on an all -inf row.)"""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    logits[2] = float("-inf")
    logits.requires_grad_()
    g = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    p = sinkhorn(logits, 4, temperature=0.6)
    (dp,) = torch.autograd.grad(p, logits, g)
    rest = [0, 1, 3, 4, 5]
    sub = logits.detach()[rest].requires_grad_()
    want = _unrolled_sinkhorn(sub)
    (dwant,) = torch.autograd.grad(want, sub, g[rest])
    assert torch.equal(p[2], torch.zeros(6, dtype=torch.float64)) and torch.equal(dp[2], torch.zeros_like(dp[2]))
    torch.testing.assert_close(p[rest], want, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(dp[rest], dwant, atol=1e-12, rtol=1e-12)


def test_sinkhorn_is_doubly_stochastic_and_identity_sort_is_block_local():
    p = sinkhorn(torch.randn(3, 6, 6, dtype=torch.float64), 60)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 6, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 6, dtype=torch.float64), atol=1e-9, rtol=0)
    q, k, v = make_qkv(1, 2, 2, 23, 23, 4, dtype=torch.float64, seed=32, requires_grad=False)
    eye = torch.eye(5, dtype=torch.float64).expand(1, 2, 5, 5)
    expected = sa.reference_attention(q, k, v, sa.BlockLocal(5).mask(23, 23))
    torch.testing.assert_close(sinkhorn_attention(q, k, v, eye, block=5), expected, atol=1e-12, rtol=1e-12)


def test_causal_sinkhorn_ignores_the_future():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 4, dtype=torch.float64, seed=33, requires_grad=False)
    p = sinkhorn(torch.randn(1, 2, 5, 5, dtype=torch.float64), 8, causal=True)
    assert torch.equal(p.triu(), torch.zeros_like(p)), "causal sorting may only bring earlier blocks"
    base = sinkhorn_attention(q, k, v, p, block=4, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:], v2[:, :, 10:] = 7.0, -3.0
    torch.testing.assert_close(sinkhorn_attention(q, k2, v2, p, block=4, causal=True)[:, :, :10], base[:, :, :10],
                               atol=0, rtol=0)


# --- explain and validation ---------------------------------------------------------------


def test_explain_static_pattern_is_its_mask_without_padding():
    q, k, _ = make_qkv(2, 2, 1, 20, 24, 4, requires_grad=False)
    kpm = padding_mask(2, 24)
    kept = explain(q, k, sa.SlidingWindow(3), key_padding_mask=kpm)
    expected = sa.SlidingWindow(3).mask(20, 24) & ~kpm[:, None, None, :]
    assert torch.equal(kept, expected.expand(2, 2, 20, 24))


def test_kept_stats():
    kept = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    kept[0, 0, 1, 0] = kept[0, 0, 2, 2] = kept[0, 0, 2, 3] = True
    st = kept_stats(kept)
    assert st.density == 3 / 16 and st.empty_rows == 0.5 and abs(st.mean_distance - (1 + 0 + 1) / 3) < 1e-12


@pytest.mark.parametrize(("make", "exc", "match"), [
    (lambda: TopK(0), ValueError, "k must be >= 1"),
    (lambda: TopK(-2), ValueError, "k must be >= 1"),
    (lambda: TopK(2.5), TypeError, "k must be an int"),
    (lambda: TopK(3, chunk_size=0), ValueError, "chunk_size"),
    (lambda: ProbSparse(0), ValueError, "factor"),
    (lambda: ProbSparse(-1.0), ValueError, "factor"),
    (lambda: ProbSparse(causal_lazy="median"), ValueError, "causal_lazy"),
    (lambda: ProbSparse(2) & sa.Causal(), TypeError, "causal=True"),
    (lambda: LSH(0), ValueError, "bucket_size"),
    (lambda: LSH(8, n_hashes=0), ValueError, "n_hashes"),
    (lambda: LSH(8, n_buckets=3), ValueError, "n_buckets must be even"),
    (lambda: LSH(8) & sa.Causal(), TypeError, "causal=True"),
    (lambda: Routing(torch.zeros(0, 8)), ValueError, "num_clusters"),
    (lambda: Routing(torch.zeros(8)), ValueError, "centroids"),
    (lambda: Routing(torch.zeros(2, 8), capacity=0), ValueError, "capacity"),
    (lambda: ProbSparse(float("inf")), ValueError, "factor must be a positive finite real number, got inf"),
    (lambda: ProbSparse(True), TypeError, "factor"),
    (lambda: ProbSparse(seed=2**70), ValueError, "seed must be <="),
    (lambda: LSH(8, seed=-(2**70)), ValueError, "seed must be >="),
    (lambda: LSH(8, seed=1.5), TypeError, "seed must be an int"),
])
def test_bad_configurations(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_explicit_backend_is_refused_for_content_based_mechanisms():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 4, requires_grad=False)
    with pytest.raises(ValueError, match="backend='blocksparse'"):
        sa.attention(q, k, v, TopK(2), backend="blocksparse")


def test_routing_padding_never_takes_a_real_tokens_slot():
    """Padded tokens are ranked last in every cluster: with a fixed capacity, the real rows' output does
    not depend on how many padded tokens follow or what they hold (self-attention, N == S)."""
    torch.manual_seed(0)
    B, H, R, D = 1, 2, 20, 8
    mech = Routing(_centroids((4, D)), capacity=6)
    real = [torch.randn(B, H, R, D, dtype=torch.float64) for _ in range(3)]
    outs = []
    for pad in (3, 9):
        q, k, v = (torch.cat([t, 50 * torch.randn(B, H, pad, D, dtype=torch.float64)], 2) for t in real)
        kpm = torch.zeros(B, R + pad, dtype=torch.bool)
        kpm[:, R:] = True
        outs.append(sa.attention(q, k, v, mech, key_padding_mask=kpm)[:, :, :R])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "kpm"])
@pytest.mark.parametrize("capacity", [None, 7], ids=["cap-default", "cap7"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 100, 100, 8, 8), (2, 4, 2, 50, 70, 8, 5)],
                         ids=lambda s: "B{}-H{}/{}-N{}-S{}-D{}-Dv{}".format(*s))
def test_routing_fused_kernel_path_equals_the_plain_path(shape, causal, masked, capacity, monkeypatch):
    """Clusters as items on the fused CPU kernel, merged through their log-sum-exps, with the kernel's
    backward fed each query's merged output and LSE: equal in fp64 (output and gradients) to plain ops."""
    from sparse_attention.dynamic import routing

    B, Hq, Hkv, N, S, D, Dv = shape
    mech = Routing(_centroids((4, D)), capacity=capacity, causal=causal)
    kpm = padding_mask(B, S) if masked else None
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, Dv, dtype=torch.float64)
    g = torch.randn(B, Hq, N, Dv, dtype=torch.float64)

    def run(a, b, c):
        return mech.attend(a, b, c, key_padding_mask=kpm, scale=D**-0.5, dropout_p=0.0)

    fused = run_and_grad(run, q, k, v, g)
    monkeypatch.setattr(routing, "all_finite", lambda *t: False)  # the plain-op path
    for name, x, y in zip(("out", "dq", "dk", "dv"), fused, run_and_grad(run, q, k, v, g), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "kpm"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 100, 100, 8, 8), (2, 4, 2, 50, 70, 13, 5), (1, 2, 1, 300, 300, 64, 64)],
                         ids=lambda s: "B{}-H{}/{}-N{}-S{}-D{}-Dv{}".format(*s))
def test_routing_native_items_match_the_fused_kernel(shape, causal, masked, monkeypatch, native_build):
    """float32: the native items forward and backward (rows read, outputs and gradients added by index)
    against the fused kernel on gathered items, both against the float64 plain path (the tolerance rule,
    the kernel's error as the baseline); padded keys get exactly zero dK and dV, and queries without a key
    exactly zero output and dQ."""
    from sparse_attention.dynamic import routing

    B, Hq, Hkv, N, S, D, Dv = shape
    mech = Routing(_centroids((5, D)), capacity=max(N, S) // 4, causal=causal)  # shared pairs, unrouted tokens
    kpm = padding_mask(B, S, all_padded=0 if masked and B > 1 else None) if masked else None
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, Dv, dtype=torch.float64, requires_grad=False)
    g = torch.randn(B, Hq, N, Dv, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(a, b, c):
        return mech.attend(a, b, c, key_padding_mask=kpm, scale=D**-0.5, dropout_p=0.0)

    native_run, kernel_run = _native_and_kernel_runs(run, q, k, v, g, monkeypatch)
    monkeypatch.setattr(routing, "all_finite", lambda *t: False)  # the plain-op path, in float64
    golden = run_and_grad(run, q, k, v, g)
    for name, impl, ref, gold in zip(("out", "dq", "dk", "dv"), native_run, kernel_run, golden, strict=True):
        assert_within_baseline(name, impl, ref, gold, grad=name != "out")
    if kpm is not None:
        _assert_padded_keys_get_no_gradient(kpm, *native_run[2:])
    no_key = golden[0].abs().sum(-1) == 0  # (B, Hq, N): rows whose output is exactly 0 have no key
    assert bool(no_key.any()), "the case must have queries without a key"
    for name, t in (("out", native_run[0]), ("dq", native_run[1])):
        assert torch.equal(t[no_key], torch.zeros_like(t[no_key])), f"{name}: nonzero without a key"


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("name", ["routing", "lsh"])
def test_native_items_do_not_depend_on_threads(name):
    """The native items kernels run each group (routing: a batch entry and head; LSH: a key/value head) on one
    thread in a fixed order, with no atomics: one thread and two give identical bits, output and gradients
    (a deterministic backward, RELIABILITY's determinism row)."""
    mech = {"routing": Routing(_centroids((6, 16)), capacity=40),
            "lsh": LSH(16, n_hashes=2, seed=3)}[name]
    q, k, v = make_qkv(2, 4, 2, 150, 150, 16, seed=6)
    g = torch.randn(2, 4, 150, 16, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run_and_grad(lambda a, b, c: sa.attention(a, b, c, mech), q, k, v, g)
        torch.set_num_threads(1)
        one = run_and_grad(lambda a, b, c: sa.attention(a, b, c, mech), q, k, v, g)
    finally:
        torch.set_num_threads(threads)
    for grad_name, a, b in zip(("out", "dq", "dk", "dv"), one, two, strict=True):
        assert torch.equal(a, b), grad_name


@pytest.mark.parametrize("lengths", [(0, 5), (5, 0), (0, 0)], ids=["no-queries", "no-keys", "empty"])
@pytest.mark.parametrize("name", ["topk", "probsparse", "lsh", "routing"])
def test_content_mechanisms_with_empty_lengths(name, lengths):
    """No queries: an empty output; no keys: zeros; gradients zero, explain's pairs empty (GQA, Hkv = 1)."""
    N, S = lengths
    if name == "lsh" and N != S:
        pytest.skip("LSH is self-attention")
    mech = {"topk": TopK(3), "probsparse": ProbSparse(seed=0), "lsh": LSH(4),
            "routing": Routing(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))}[name]
    q, k, v = make_qkv(1, 2, 1, N, S, 8)
    out = sa.attention(q, k, v, mech)
    assert out.shape == (1, 2, N, 8) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for grad_name, t in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert t is not None and torch.equal(t, torch.zeros_like(t)), f"{grad_name} should be zeros"
    assert explain(q, k, mech).shape == (1, 2, N, S)


@pytest.mark.parametrize("kernels", ["native", "fused"])
@pytest.mark.parametrize("mech", ["lsh2", "lsh4", "routing"])
def test_merging_rounds_and_clusters_with_huge_scores(mech, kernels, monkeypatch):
    """A query found in several LSH rounds or routing clusters has its parts merged into one softmax; with
    scores of 1e9 and more (RELIABILITY's large logits: bf16 inputs of 133120, fp32 of 3e4) the output is
    still a convex combination of the values: equal values give that value (a merge through the rounded
    log-sum-exp gave the value times the number of parts), on the native kernels and on the fused one."""
    if kernels == "fused":
        monkeypatch.setattr(native, "items_available", lambda: False)
    m = {"lsh2": LSH(bucket_size=4, n_hashes=2), "lsh4": LSH(bucket_size=4, n_hashes=4),
         "routing": Routing(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), capacity=12)}[mech]
    for value, dtype in ((133120.0, torch.bfloat16), (3e4, torch.float32)):
        x = torch.full((1, 1, 16, 8), value, dtype=dtype)
        out = sa.attention(x, x, x, m)
        has_key = explain(x, x, m).any(-1)[..., None]  # (routing: a query no cluster took gets 0)
        torch.testing.assert_close(out, torch.where(has_key, x, 0.0), msg=lambda s, d=dtype: f"{d}: {s}")
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8, requires_grad=False, seed=35)
    q, k = q * 3e3, k * 3e3  # scores ~1e7: a near-argmax softmax over the kept pairs
    out = sa.attention(q, k, v, m)
    want = sa.reference_attention(q.double(), k.double(), v.double(), explain(q, k, m))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("D", [8, 128])
def test_topk_explain_and_attention_share_the_default_scale(D):
    """With all scores tied, the kept pairs hinge on the last bit of the scale: explain's default must be
    sa.attention's (1/sqrt(D); D**-0.5 differs by an ulp in float64 for D = 8 and 128), and the output must
    be dense attention over exactly the pairs explain reports."""
    x = torch.ones(1, 1, 16, D, dtype=torch.float64)
    v = torch.randn(1, 1, 16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for mech in (TopK(4), TopK(4) & sa.Causal()):
        out = sa.attention(x, x, v, mech)
        kept = explain(x, x, mech)
        assert torch.equal(kept, explain(x, x, mech, scale=1 / D**0.5))
        torch.testing.assert_close(out, sa.reference_attention(x, x, v, kept), atol=1e-12, rtol=0)


def test_explain_refuses_what_attention_refuses():
    """explain checks a restricted mechanism's static part as sa.attention does (it returned an all-False
    mask for indices past S, and a RuntimeError for a per-head count that does not match)."""
    q = torch.randn(2, 2, 16, 8)
    cases = [((q, q[:, :, :3], TopK(2) & sa.Global([5])), ValueError, r"\[0, S=3\)"),
             ((q, q, TopK(2) & sa.PerHead([sa.Causal()] * 3)), ValueError, "per-head with 3 heads"),
             ((q, q, "causal"), TypeError, "mechanism must be")]
    for (a, b, mech), exc, match in cases:
        with pytest.raises(exc, match=match):
            explain(a, b, mech)
        if not isinstance(mech, str):
            with pytest.raises(exc, match=match):
                sa.attention(a, b, b, mech)
