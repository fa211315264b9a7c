"""The documented contracts: NaN propagation, empty rows and lengths, strides, dropout, dtypes, gradcheck."""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, padding_mask

import sparse_attention as sa
from sparse_attention.engine import _run_blocksparse

BACKENDS = ["blocksparse", "dense"]
SOME_PATTERNS = {
    "none": None,
    "causal": sa.Causal(),
    "sliding_window": sa.SlidingWindow(5),
    "bigbird_b16": sa.BigBird(block=16, random_blocks=1),
    "strided3": sa.Strided(3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SOME_PATTERNS))
def test_nan_in_query_row_propagates(name, backend):
    pattern = SOME_PATTERNS[name]
    q, k, v = make_qkv(2, 4, 2, 37, 37, 8, requires_grad=False)
    q[1, 2, 20, 3] = float("nan")
    out = sa.attention(q, k, v, pattern, backend=backend)
    assert torch.isnan(out[1, 2, 20]).all(), "out row with a NaN query must be NaN (not zeros)"
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[1, 2, 20] = False
    assert torch.isfinite(out[others]).all(), "out: rows without NaN input must stay finite"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_query_row_propagates_in_bf16(backend):
    q, k, v = make_qkv(1, 2, 1, 37, 37, 8, dtype=torch.bfloat16, requires_grad=False)
    q[0, 1, 5, 0] = float("nan")
    out = sa.attention(q, k, v, sa.SlidingWindow(6), backend=backend)
    assert torch.isnan(out[0, 1, 5]).all(), "out row with a NaN query"
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, 6:]).all(), "out other rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_zero_output_and_dq(backend):
    """Rows whose every allowed key is padded: exact 0 output and dq; nothing non-finite anywhere."""
    N = S = 37
    q, k, v = make_qkv(2, 2, 2, N, S, 8)
    kpm = torch.zeros(2, S, dtype=torch.bool)
    kpm[0, :10] = True  # causal rows 0..9 of batch 0 lose all their keys
    out = sa.attention(q, k, v, sa.Causal(), key_padding_mask=kpm, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(out[0, :, :10], torch.zeros_like(out[0, :, :10])), "out of fully-masked rows"
    assert torch.equal(dq[0, :, :10], torch.zeros_like(dq[0, :, :10])), "dq of fully-masked rows"
    assert torch.equal(dk[0, :, :10], torch.zeros_like(dk[0, :, :10])), "dk of padded keys"
    assert torch.equal(dv[0, :, :10], torch.zeros_like(dv[0, :, :10])), "dv of padded keys"
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} not finite"


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("name", ["none", "causal", "sliding_window"])
def test_zero_queries_gives_empty_output(name, backend):
    q, k, v = make_qkv(2, 4, 2, 0, 9, 8, 5)
    out = sa.attention(q, k, v, SOME_PATTERNS[name], backend=backend)
    assert out.shape == (2, 4, 0, 5) and out.dtype == q.dtype
    out.sum().backward()
    for name_, t in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert t is not None and torch.equal(t, torch.zeros_like(t)), f"{name_} should be zeros"


@pytest.mark.parametrize("call", ["sliding_window", "topk", "probsparse", "lsh", "routing", "linear", "compressed",
                                  "nystrom"])
def test_no_batch_entry_gives_empty_output(call):
    """An empty batch: an empty output and empty gradients, on every kind of call (a reshape with -1 once
    failed there, PyTorch cannot infer it for an empty tensor)."""
    q, k, v = make_qkv(0, 4, 2, 9, 9, 8, 5)
    mechanisms = {"sliding_window": sa.SlidingWindow(3), "topk": sa.TopK(3), "probsparse": sa.ProbSparse(),
                  "lsh": sa.LSH(4), "routing": sa.Routing(torch.randn(4, 2, 8))}
    if call in mechanisms:
        out = sa.attention(q, k, v, mechanisms[call])
    elif call == "linear":
        out = sa.linear_attention(q, k, v)
    elif call == "nystrom":
        out = sa.approx.nystrom_attention(q, k, v, num_landmarks=3)
    else:
        out = sa.approx.compressed_attention(q, k, v, k_weight=torch.randn(8, 8, 3), v_weight=torch.randn(5, 5, 3),
                                             stride=3)
    assert out.shape == (0, 4, 9, 5)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))


def _no_head_calls():
    from sparse_attention.dynamic.sinkhorn import sinkhorn_attention
    N, D = 12, 8
    calls = {f"attention-{name}": (lambda q, k, v, m=m: sa.attention(q, k, v, m)) for name, m in [
        ("dense", None), ("causal", sa.Causal()), ("sliding_window", sa.SlidingWindow(3)), ("strided", sa.Strided(3)),
        ("bigbird", sa.BigBird(4, 1, 1, 1)), ("topk", sa.TopK(3)), ("probsparse", sa.ProbSparse(seed=0)),
        ("lsh", sa.LSH(4)), ("routing", sa.Routing(torch.randn(3, D, generator=torch.Generator().manual_seed(0))))]}
    calls.update({
        "linear": lambda q, k, v: sa.linear_attention(q, k, v),
        "linear-causal": lambda q, k, v: sa.linear_attention(q, k, v, causal=True),
        "linformer": lambda q, k, v: sa.approx.linformer_attention(q, k, v, e_proj=torch.randn(4, N)),
        "nystrom": lambda q, k, v: sa.approx.nystrom_attention(q, k, v, num_landmarks=4),
        "compressed": lambda q, k, v: sa.approx.compressed_attention(q, k, v, k_weight=torch.randn(D, D, 3),
                                                                     v_weight=torch.randn(D, D, 3), stride=3),
        "sinkhorn": lambda q, k, v: sinkhorn_attention(q, k, v, torch.eye(3).expand(2, 0, 3, 3), block=4),
        "reference": lambda q, k, v: sa.reference_attention(q, k, v),
        "synthesizer": lambda q, k, v: sa.approx.synthesizer_attention(torch.randn(N, N), v),
        "synthesizer-dot": lambda q, k, v: sa.approx.synthesizer_attention(torch.randn(N, N), v, q=q, k=k,
                                                                           dot_weight=0.5),
    })
    return calls


@pytest.mark.parametrize("call", list(_no_head_calls()))
def test_no_heads_gives_empty_output(call):
    """No heads on either side (Hq = Hkv = 0), as SDPA takes it: an empty output and empty gradients from every
    front door (Hkv = 0 once made the head check divide by zero)."""
    q, k, v = make_qkv(2, 0, 0, 12, 12, 8)
    out = _no_head_calls()[call](q, k, v)
    assert out.shape == (2, 0, 12, 8)
    out.sum().backward()
    used = (v,) if call == "synthesizer" else (q, k, v)  # (plain synthesizer attention reads no q or k)
    assert all(t.grad is not None and t.grad.shape == t.shape for t in used)


@pytest.mark.parametrize("mech", [sa.Causal(), sa.TopK(3), sa.ProbSparse(seed=0), sa.LSH(4)], ids=str)
def test_explain_with_no_heads(mech):
    q, k, _ = make_qkv(2, 0, 0, 12, 12, 8)
    kept = sa.explain(q, k, mech)
    assert kept.shape == (2, 0, 12, 12) and kept.dtype == torch.bool


def test_query_heads_without_key_heads_are_refused():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8)
    with pytest.raises(ValueError, match=r"k and v have no heads \(k.shape\[1\]=0\) while q has 2"):
        sa.attention(q, k[:, :0], v[:, :0])


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("name", ["none", "causal", "strided3"])
def test_zero_keys_gives_zeros(name, backend):
    q, k, v = make_qkv(2, 4, 2, 6, 0, 8, 5)
    out = sa.attention(q, k, v, SOME_PATTERNS[name], backend=backend)
    assert out.shape == (2, 4, 6, 5)
    assert torch.equal(out, torch.zeros_like(out)), "out with no keys"
    dq, = torch.autograd.grad(out, (q,), torch.randn_like(out))
    assert torch.equal(dq, torch.zeros_like(dq)), "dq with no keys"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["causal", "sliding_window", "bigbird_b16"])
def test_non_contiguous_inputs_equal_contiguous(name, backend):
    pattern = SOME_PATTERNS[name]
    B, H, Hkv, N, S, D = 2, 4, 2, 37, 45, 8
    # (B, N, H, D) storage viewed as (B, H, N, D): a transposed view
    qs = torch.randn(B, N, H, D)
    ks = torch.randn(B, S, Hkv, D)
    vs = torch.randn(B, Hkv, S, 2 * D)[..., ::2]  # last-dim stride 2
    q, k, v = qs.transpose(1, 2), ks.transpose(1, 2), vs
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kpm = padding_mask(B, S)
    a = sa.attention(q, k, v, pattern, key_padding_mask=kpm, backend=backend)
    b = sa.attention(q.contiguous(), k.contiguous(), v.contiguous(), pattern, key_padding_mask=kpm, backend=backend)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"out: {m}")
    # non-contiguous upstream gradient
    qa, ka, va = (t.detach().requires_grad_() for t in (q, k, v))
    qb, kb, vb = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    g = torch.randn(B, N, H, D).transpose(1, 2)
    ga = torch.autograd.grad(sa.attention(qa, ka, va, pattern, key_padding_mask=kpm, backend=backend),
                             (qa, ka, va), g)
    gb = torch.autograd.grad(sa.attention(qb, kb, vb, pattern, key_padding_mask=kpm, backend=backend),
                             (qb, kb, vb), g.contiguous())
    for n, x, y in zip(("dq", "dk", "dv"), ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_stride0_kv_equal_materialised(backend):
    q = torch.randn(2, 2, 20, 8)
    k1, v1 = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    k, v = k1.expand(2, -1, -1, -1), v1.expand(2, -1, -1, -1)
    a = sa.attention(q, k, v, sa.Causal(), backend=backend)
    b = sa.attention(q, k.contiguous(), v.contiguous(), sa.Causal(), backend=backend)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"out: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["none", "causal", "sliding_window"])
def test_dropout_one_gives_zeros(name, backend):
    q, k, v = make_qkv(2, 2, 1, 37, 37, 8)
    out = sa.attention(q, k, v, SOME_PATTERNS[name], dropout_p=1.0, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)), "out with dropout_p=1"
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for n, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{n} not finite under dropout_p=1"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["none", "causal", "bigbird_b16"])
def test_dropout_seeded_reproducible(name, backend):
    q, k, v = make_qkv(2, 2, 1, 37, 37, 8, requires_grad=False)
    pattern = SOME_PATTERNS[name]
    torch.manual_seed(123)
    a = sa.attention(q, k, v, pattern, dropout_p=0.3, backend=backend)
    torch.manual_seed(123)
    b = sa.attention(q, k, v, pattern, dropout_p=0.3, backend=backend)
    torch.manual_seed(124)
    c = sa.attention(q, k, v, pattern, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b), "same seed must give a bitwise-equal dropout output"
    assert not torch.equal(a, c), "a different seed must change the dropout output"
    nodrop = sa.attention(q, k, v, pattern, backend=backend)
    assert not torch.allclose(a, nodrop), "dropout_p=0.3 had no effect"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_unbiased(backend):
    """E[dropout output] = output without dropout (loose statistical check over many seeds)."""
    q, k, v = make_qkv(1, 2, 1, 24, 24, 8, requires_grad=False)
    pattern = sa.SlidingWindow(6)
    ref = sa.attention(q, k, v, pattern, backend=backend)
    torch.manual_seed(0)
    n = 200
    mean = sum(sa.attention(q, k, v, pattern, dropout_p=0.2, backend=backend) for _ in range(n)) / n
    # per-element std of one sample is O(|v|*sqrt(p/(1-p))/sqrt(window)) ~ 0.3; mean of 200: ~0.02
    err = (mean - ref).abs()
    assert err.mean() < 0.03, f"dropout output biased: mean |E[out]-out| = {err.mean():.4f}"
    assert err.max() < 0.15, f"dropout output biased: max |E[out]-out| = {err.max():.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keeps_empty_rows_zero_and_grad_flows(backend):
    q, k, v = make_qkv(1, 2, 1, 30, 12, 8)
    out = sa.attention(q, k, v, sa.Causal(), dropout_p=0.2, backend=backend)
    assert torch.equal(out[:, :, :18], torch.zeros_like(out[:, :, :18])), "empty causal rows under dropout"
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv)), "grads finite under dropout"
    assert dv.abs().sum() > 0, "dv must flow through dropout"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
def test_output_dtype_matches_input(dtype, backend):
    q, k, v = make_qkv(2, 2, 1, 19, 23, 8, dtype=dtype)
    out = sa.attention(q, k, v, sa.SlidingWindow(4), backend=backend)
    assert out.dtype == dtype, f"out dtype {out.dtype} for {dtype} input"
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for n, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert t.dtype == dtype, f"{n} dtype {t.dtype}"
    ref = sa.reference_attention(q.double(), k.double(), v.double(), sa.SlidingWindow(4).mask(19, 23))
    atol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0, msg=lambda m: f"out: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(backend):
    """Scores around 1e8 (fp32) and bf16 inputs of 1e4: no NaN, softmax saturates to the argmax/mean."""
    q, k, v = make_qkv(1, 2, 2, 33, 33, 8, requires_grad=False)
    out = sa.attention(q * 3e3, k * 3e3, v, sa.SlidingWindow(4), backend=backend)
    assert torch.isfinite(out).all(), "out with large fp32 logits"
    qb = torch.full((1, 1, 17, 8), 1e4, dtype=torch.bfloat16)
    out = sa.attention(qb, qb, qb, sa.Causal(), backend=backend)
    assert torch.isfinite(out).all(), "out with large bf16 logits"
    torch.testing.assert_close(out, qb, msg=lambda m: f"out: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_state_between_calls(backend):
    """The same call twice (with a different call between) gives bitwise-equal output."""
    q, k, v = make_qkv(2, 2, 2, 37, 37, 8, requires_grad=False)
    a = sa.attention(q, k, v, sa.BigBird(block=16, random_blocks=1), backend=backend)
    sa.attention(q[:, :, :20], k, v, sa.SlidingWindow(3), backend=backend)
    b = sa.attention(q, k, v, sa.BigBird(block=16, random_blocks=1), backend=backend)
    assert torch.equal(a, b)


# --- gradcheck in fp64 through the block-sparse engine with a tiny block --------------------------------

GRADCHECK_CASES = {
    # name: (pattern, B, Hq, Hkv, N, S, D, Dv, padded keys of batch 0)
    "causal-B1-H2-N11-S11-D4-rowmasked": (sa.Causal(), 1, 2, 2, 11, 11, 4, 4, (0, 1, 2)),
    "sliding3-B1-H2kv1-N11-S7-D4-Dv3": (sa.SlidingWindow(3), 1, 2, 1, 11, 7, 4, 3, None),
    "strided3_causal-B2-H2kv1-N7-S13-D5": (sa.Strided(3, causal=True), 2, 2, 1, 7, 13, 5, 5, (12,)),
    "bigbird_b4-B1-H2-N11-S11-D4": (sa.BigBird(block=4, random_blocks=1), 1, 2, 2, 11, 11, 4, 4, (3, 4)),
    "longformer_dil2-B1-H4kv2-N9-S9-D3": (sa.Longformer(2, global_indices=(4,), dilation=2), 1, 4, 2, 9, 9, 3, 3,
                                          None),
    "per_head-B1-H2-N10-S10-D4": (sa.PerHead([sa.Causal(), sa.BlockLocal(3)]), 1, 2, 2, 10, 10, 4, 4, (0,)),
    "causal_N_gt_S-B1-H2-N11-S6-D4": (sa.Causal(), 1, 2, 2, 11, 6, 4, 4, None),
}


@pytest.mark.parametrize("block", [4, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_blocksparse_fp64(case, block):
    pattern, B, Hq, Hkv, N, S, D, Dv, padded = GRADCHECK_CASES[case]
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, Dv, dtype=torch.float64, seed=11)
    kpm = None
    if padded is not None:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, list(padded)] = True
    fn = lambda a, b, c: _run_blocksparse(a, b, c, pattern, scale=0.7, key_padding_mask=kpm,  # noqa: E731
                                          block=block)
    # fast_mode checks a random projection of the Jacobian; the slow marker runs the full check
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=block == 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_public_entry_fp64(backend):
    q, k, v = make_qkv(1, 2, 1, 11, 9, 4, 3, dtype=torch.float64, seed=12)
    kpm = torch.zeros(1, 9, dtype=torch.bool)
    kpm[0, :4] = True
    fn = lambda a, b, c: sa.attention(a, b, c, sa.Causal(), key_padding_mask=kpm, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_on_the_plain_ops_path(backend):
    """The plain-ops path (taken with dropout, or any non-finite element in q, k or v) divides by the
    softmax's own sum: with scores ~1e8 a NaN in batch entry 1 left entry 0 at 7x its value (exp(s - lse)
    with lse rounded); and finite fp16 inputs of 30000 are finite inputs (their fp16 sum overflowed, which
    sent them to that path as non-finite)."""
    q = torch.full((2, 1, 64, 8), 1e4)
    v = torch.randn(2, 1, 64, 8, generator=torch.Generator().manual_seed(3))
    pattern = sa.SlidingWindow(3)
    want = sa.reference_attention(q.double(), q.double(), v.double(), pattern.mask(64, 64))
    v[1, 0, 0, 0] = float("nan")
    out = sa.attention(q, q, v, pattern, backend=backend)
    torch.testing.assert_close(out[0].double(), want[0], atol=1e-6, rtol=0)
    x = torch.full((1, 1, 64, 8), 30000.0, dtype=torch.float16)
    assert torch.equal(sa.attention(x, x, x, pattern, backend=backend), x)


def test_no_keys_gives_zeros_even_with_non_finite_queries():
    """S = 0: every row is 0 with gradient 0, also when another row's query holds NaN or inf (a product with
    q.sum() * 0 spread them over every row); sa.attention, linear attention and compressed attention."""
    from sparse_attention.approx import compressed_attention

    q, k, v = make_qkv(1, 2, 2, 3, 0, 4)
    with torch.no_grad():
        q[0, 0, 0, 0], q[0, 1, 2, 1] = float("nan"), float("inf")
    calls = {"attention": lambda: sa.attention(q, k, v),
             "linear": lambda: sa.linear_attention(q, k, v),
             "compressed": lambda: compressed_attention(q, k, v, k_weight=torch.randn(4, 4, 2),
                                                        v_weight=torch.randn(4, 4, 2), stride=2)}
    for name, call in calls.items():
        out = call()
        assert torch.equal(out, torch.zeros(1, 2, 3, 4)), name
        dq, = torch.autograd.grad(out, q, torch.ones_like(out))
        assert torch.equal(dq, torch.zeros_like(q)), name
