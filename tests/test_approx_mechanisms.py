"""Linformer, compressed attention, Nyström and Synthesizer: functional cores against their readable
references and against full softmax attention where they reduce to it; the nn modules around them."""

from __future__ import annotations

import pytest
import torch
from conftest import check_against_reference, make_qkv, padding_mask

import sparse_attention as sa
from sparse_attention.approx import (
    compressed_attention,
    compressed_length,
    iterative_pinv,
    linformer_attention,
    nystrom_attention,
    reference_compressed_attention,
    reference_linformer_attention,
    reference_nystrom_attention,
    reference_synthesizer_attention,
    synthesizer_attention,
)

# B, Hq, Hkv, N, S, D, Dv
SHAPES = [(1, 1, 1, 1, 1, 4, 4), (2, 4, 2, 37, 37, 7, 5), (1, 3, 1, 23, 41, 16, 8)]


def _id(s):
    return "B{}-H{}/{}-N{}-S{}-D{}-Dv{}".format(*s)


def _grads_close(fn, ref, q, k, v, *, rtol=1e-9, atol=1e-11):
    """Forward and (q, k, v) gradients of fn and ref in float64 with one random upstream gradient."""
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    g = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), g, allow_unused=True))
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out2 = ref(q2, k2, v2)
    want = (out2, *torch.autograd.grad(out2, (q2, k2, v2), g, allow_unused=True))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        a = torch.zeros_like(q) if a is None and b is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- Linformer


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_linformer_identity_is_full_attention(shape, per_head):
    B, Hq, Hkv, N, S, D, Dv = shape
    q, k, v = make_qkv(*shape)
    eye = torch.eye(S)
    e = eye.expand(Hkv, S, S).clone() if per_head else eye
    check_against_reference(lambda a, b, c: linformer_attention(a, b, c, e_proj=e), q, k, v, None)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_linformer_matches_reference_shorter_sequence_and_padding(shape):
    B, Hq, Hkv, N, S, D, Dv = shape
    L, K = S + 5, 6
    g = torch.Generator().manual_seed(1)
    e, f = torch.randn(Hkv, K, L, generator=g, dtype=torch.float64), torch.randn(K, L, generator=g,
                                                                                dtype=torch.float64)
    kpm = padding_mask(B, S, all_padded=B - 1 if B > 1 else None)
    q, k, v = make_qkv(*shape, dtype=torch.float64)
    opts = dict(e_proj=e, f_proj=f, key_padding_mask=kpm)
    _grads_close(lambda a, b, c: linformer_attention(a, b, c, **opts),
                 lambda a, b, c: reference_linformer_attention(a, b, c, **opts), q, k, v)
    out = linformer_attention(q, k, v, **opts)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[kpm[:, None, :, None].expand_as(k2)] = 1e30  # finite junk at padded keys changes nothing
    v2[kpm[:, None, :, None].expand_as(v2)] = float("nan")
    torch.testing.assert_close(linformer_attention(q, k2, v2, **opts), out)


def test_linformer_gradcheck_includes_projections():
    q, k, v = make_qkv(1, 2, 1, 5, 5, 3, dtype=torch.float64)
    e = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, p: linformer_attention(a, b, c, e_proj=p), (q, k, v, e))


def test_linformer_module():
    m = sa.nn.LinformerAttention(16, 4, num_heads=2, share_kv=True)
    assert m.f_proj is None and m.e_proj.shape == (2, 4, 16)
    q, k, v = make_qkv(2, 4, 2, 10, 10, 8)
    out = m(q, k, v, key_padding_mask=padding_mask(2, 10))
    out.backward(torch.randn_like(out))
    assert m.e_proj.grad is not None and m.e_proj.grad[..., 10:].abs().sum() == 0  # unused columns
    with pytest.raises(ValueError, match="longer than the seq_len"):
        m(*make_qkv(1, 2, 2, 17, 17, 8))
    with pytest.raises(ValueError, match="causal"):
        sa.nn.LinformerAttention(16, 4, causal=True)
    with pytest.raises(ValueError, match="causal"):
        linformer_attention(q, k, v, e_proj=torch.eye(10), causal=True)
    with pytest.raises(ValueError, match="e_proj"):
        linformer_attention(q, k, v, e_proj=torch.eye(10)[None].expand(3, 10, 10))
    with pytest.raises(TypeError, match="e_proj"):
        linformer_attention(q, k, v, e_proj=None)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sa.nn.LinformerAttention(16, 0)
    with pytest.raises(ValueError, match="same K"):  # keys and values would not pair up
        linformer_attention(q, k, v, e_proj=torch.randn(5, 10), f_proj=torch.randn(3, 10))


# ----------------------------------------------------------------------------- compressed


@pytest.mark.parametrize("masked", [True, False], ids=["padded", "no-mask"])
@pytest.mark.parametrize("w, s", [(3, 3), (4, 2), (5, 1), (2, 5), (2, 3), (1, 1)])
@pytest.mark.parametrize("shape", SHAPES + [(1, 2, 2, 5, 6, 4, 4)], ids=_id)
def test_compressed_matches_reference(shape, w, s, masked):
    """Against the readable form, with and without padding (a stride longer than the kernel can leave a last
    window past the last key: S=6, w=2, s=3; it is masked with or without a padding mask)."""
    B, Hq, Hkv, N, S, D, Dv = shape
    g = torch.Generator().manual_seed(2)
    kw, vw = torch.randn(D, D, w, generator=g, dtype=torch.float64), torch.randn(3, Dv, w, generator=g,
                                                                                dtype=torch.float64)
    kb, vb = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    kpm = padding_mask(B, S, all_padded=B - 1 if B > 1 else None) if masked else None
    opts = dict(k_weight=kw, v_weight=vw, k_bias=kb, v_bias=vb, stride=s, key_padding_mask=kpm)
    q, k, v = make_qkv(*shape, dtype=torch.float64)
    _grads_close(lambda a, b, c: compressed_attention(a, b, c, **opts),
                 lambda a, b, c: reference_compressed_attention(a, b, c, **opts), q, k, v)
    if B > 1 and masked:
        assert torch.equal(compressed_attention(q, k, v, **opts)[B - 1], torch.zeros(Hq, N, 3, dtype=torch.float64))


def test_compressed_length_rule():
    assert [compressed_length(S, 3, 3) for S in (0, 1, 2, 3, 4, 9, 10)] == [0, 1, 1, 1, 2, 3, 4]
    assert compressed_length(10, 4, 2) == 4 and compressed_length(7, 2, 5) == 2


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_compressed_identity_kernel_is_full_attention(shape):
    B, Hq, Hkv, N, S, D, Dv = shape
    q, k, v = make_qkv(*shape)
    kw, vw = torch.eye(D)[:, :, None], torch.eye(Dv)[:, :, None]
    check_against_reference(lambda a, b, c: compressed_attention(a, b, c, k_weight=kw, v_weight=vw, stride=1),
                            q, k, v, None)


def test_compressed_module_starts_as_mean_pooling():
    m = sa.nn.CompressedAttention(3, head_dim=4)
    q, k, v = make_qkv(1, 2, 2, 6, 7, 4, dtype=torch.float64, requires_grad=False)
    m = m.double()
    pad = torch.zeros(1, 2, 2, 4, dtype=torch.float64)  # 7 -> 9 = (3 - 1) * 3 + 3
    kp, vp = torch.cat([k, pad], 2), torch.cat([v, pad], 2)
    km, vm = kp.unflatten(2, (3, 3)).mean(3), vp.unflatten(2, (3, 3)).mean(3)  # (1, 2, 3, 4)
    torch.testing.assert_close(m(q, k, v), sa.reference_attention(q, km, vm))
    with pytest.raises(ValueError, match="stride"):
        sa.nn.CompressedAttention(3, 0, head_dim=4)
    with pytest.raises(ValueError, match="k_weight"):
        compressed_attention(q, k, v, k_weight=torch.ones(4, 5, 3), v_weight=torch.ones(4, 4, 3), stride=1)
    with pytest.raises(ValueError, match="kernel size"):
        compressed_attention(q, k, v, k_weight=torch.ones(4, 4, 3), v_weight=torch.ones(4, 4, 2), stride=1)


# ----------------------------------------------------------------------------- Nyström


@pytest.mark.parametrize("shape", [(2, 2, 1, 12, 12, 16, 8), (1, 4, 4, 9, 9, 7, 7)], ids=_id)
def test_nystrom_with_all_landmarks_is_full_attention(shape):
    """m = N = S: out = A pinv(A) A V = A V. Tolerance from the pinv residual ‖I - A Z‖."""
    B, Hq, Hkv, N, S, D, Dv = shape
    q, k, v = make_qkv(*shape, dtype=torch.float64, requires_grad=False)
    a = torch.softmax(q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) / D**0.5, -1)
    z = iterative_pinv(a, iterations=30)
    residual = float((torch.eye(N, dtype=torch.float64) - a @ z).abs().max())
    assert residual < 1e-10, residual
    out = nystrom_attention(q, k, v, num_landmarks=N, pinv_iterations=30)
    golden = sa.reference_attention(q, k, v)
    # |A Z A V - A V| <= |A| |I - Z A| |A V|, and |A|_inf = 1 for a softmax matrix
    tol = 10 * N * residual * float(golden.abs().max()) + 1e-12
    assert float((out - golden).abs().max()) <= tol


@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 37, 7, 5), (1, 3, 1, 23, 41, 16, 8), (2, 2, 2, 5, 5, 4, 4)],
                         ids=_id)
@pytest.mark.parametrize("m", [1, 3, 5])
def test_nystrom_matches_exact_pinv_reference(shape, m):
    B, Hq, Hkv, N, S, D, Dv = shape
    kpm = padding_mask(B, S, all_padded=B - 1 if B > 1 else None)
    q, k, v = make_qkv(*shape, dtype=torch.float64)
    _grads_close(lambda a, b, c: nystrom_attention(a, b, c, num_landmarks=m, pinv_iterations=40, key_padding_mask=kpm),
                 lambda a, b, c: reference_nystrom_attention(a, b, c, num_landmarks=m, key_padding_mask=kpm),
                 q, k, v, rtol=1e-6, atol=1e-8)
    if B > 1:
        out = nystrom_attention(q, k, v, num_landmarks=m, key_padding_mask=kpm)
        assert torch.equal(out[B - 1], torch.zeros_like(out[B - 1]))


def test_iterative_pinv():
    a = torch.randn(3, 6, 6, dtype=torch.float64) + 6 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(iterative_pinv(a, iterations=30), torch.linalg.pinv(a))
    assert torch.equal(iterative_pinv(torch.zeros(2, 4, 4)), torch.zeros(2, 4, 4))


def test_nystrom_gradcheck_and_errors():
    q, k, v = make_qkv(1, 2, 1, 7, 6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: nystrom_attention(a, b, c, num_landmarks=3), (q, k, v))
    with pytest.raises(ValueError, match="num_landmarks"):
        nystrom_attention(q, k, v, num_landmarks=7)
    with pytest.raises(ValueError, match="num_landmarks"):
        sa.nn.NystromAttention(0)
    with pytest.raises(TypeError, match="pinv_iterations"):
        nystrom_attention(q, k, v, num_landmarks=2, pinv_iterations=1.5)


# ----------------------------------------------------------------------------- Synthesizer


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_synthesizer_fixed_random_is_softmax_r_v(causal):
    N, Dv = 9, 5
    r = torch.randn(N, N, dtype=torch.float64)
    m = sa.nn.SynthesizerAttention(12, mode="random", random_logits=torch.randn(12, 12), fixed=True, causal=causal)
    m.random_logits[0, :N, :N] = r.float()
    assert not any(True for _ in m.parameters())
    q, k, v = make_qkv(2, 3, 3, N, N, 4, Dv, requires_grad=False)
    mask = torch.tril(torch.ones(N, N, dtype=torch.bool)) if causal else torch.ones(N, N, dtype=torch.bool)
    expected = torch.softmax(r.float().masked_fill(~mask, float("-inf")), -1) @ v  # softmax(R) V
    torch.testing.assert_close(m(q, k, v), expected)
    kpm = padding_mask(2, N, all_padded=1)
    torch.testing.assert_close(synthesizer_attention(r, v.double(), causal=causal, key_padding_mask=kpm),
                               reference_synthesizer_attention(r, v.double(), causal=causal, key_padding_mask=kpm))
    assert torch.equal(synthesizer_attention(r, v, key_padding_mask=kpm)[1], torch.zeros(3, N, Dv))


def test_synthesizer_full_dot_weight_is_softmax_attention():
    q, k, v = make_qkv(2, 4, 2, 11, 11, 6)
    r = torch.randn(4, 11, 11)
    check_against_reference(lambda a, b, c: synthesizer_attention(r, c, q=a, k=b, dot_weight=1.0), q, k, v, None)


@pytest.mark.parametrize("mode", ["dense", "random", "factorized_dense", "factorized_random"])
def test_synthesizer_causal_never_reads_future(mode):
    N, t = 16, 6
    m = sa.nn.SynthesizerAttention(20, mode=mode, num_heads=2, head_dim=4, mix=True, causal=True)
    q, k, v = make_qkv(2, 2, 2, N, N, 4, requires_grad=False)
    out = m(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t + 1:] = 50 * torch.randn_like(x[:, :, t + 1:])
    out2 = m(q2, k2, v2)
    assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])
    assert not torch.equal(out[:, :, t + 1:], out2[:, :, t + 1:])


@pytest.mark.parametrize("mode", ["dense", "random", "factorized_dense", "factorized_random"])
def test_synthesizer_module_gradients(mode):
    m = sa.nn.SynthesizerAttention(16, mode=mode, head_dim=4, mix=True).double()
    q, k, v = make_qkv(1, 2, 1, 7, 7, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: m(a, b, c), (q, k, v))
    out = m(q, k, v)
    out.backward(torch.randn_like(out))
    assert all(p.grad is not None for p in m.parameters())


def test_synthesizer_gradcheck_functional():
    q, k, v = make_qkv(1, 2, 1, 5, 5, 3, dtype=torch.float64)
    r = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fn = lambda r_, a, b, c, w_: synthesizer_attention(r_, c, q=a, k=b, dot_weight=w_, causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (r, q, k, v, w))


def test_synthesizer_unmasked_fast_path_and_empty_rows():
    """Without causal or padding the softmax is one fused pass: equal to the reference, gradients included; a
    row of -inf logits is an empty row (output 0, no NaN anywhere), as with a mask."""
    v = torch.randn(2, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)  # Hq = 4 logits heads over Hkv = 2
    out = synthesizer_attention(r, v)
    ref = reference_synthesizer_attention(r, v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (r, v), g), torch.autograd.grad(ref, (r, v), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    empty = r.detach().clone()
    empty[1, 3] = float("-inf")
    empty.requires_grad_(True)
    out = synthesizer_attention(empty, v)
    assert torch.equal(out[:, 1, 3], torch.zeros(2, 3)), "an all -inf row must give 0"
    dr, dv = torch.autograd.grad(out, (empty, v), torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dv).all() and torch.isfinite(dr[empty > float("-inf")]).all()


def test_synthesizer_errors():
    v = torch.randn(1, 2, 5, 3)
    with pytest.raises(ValueError, match="mode"):
        sa.nn.SynthesizerAttention(8, mode="convolutional")
    with pytest.raises(ValueError, match="head_dim"):
        sa.nn.SynthesizerAttention(8, mode="dense")
    with pytest.raises(ValueError, match="factors"):
        sa.nn.SynthesizerAttention(8, mode="factorized_dense", head_dim=4, factors=(3, 3))
    with pytest.raises(ValueError, match="fixed"):
        sa.nn.SynthesizerAttention(8, mode="dense", head_dim=4, fixed=True)
    # an option the mode never reads is refused, not ignored
    for mode, option in (("random", {"hidden": 16}), ("dense", {"rank": 4}), ("factorized_random", {"hidden": 3}),
                         ("dense", {"factors": (2, 4)}), ("random", {"factors": (2, 4)}),
                         ("factorized_dense", {"rank": 2})):
        with pytest.raises(ValueError, match=rf"{next(iter(option))}=.+ applies to mode="):
            sa.nn.SynthesizerAttention(8, mode=mode, head_dim=4, **option)
    with pytest.raises(ValueError, match=r"scale=0.5 \(of q·kᵀ\) applies to mix=True only"):
        sa.nn.SynthesizerAttention(8, mode="random", scale=0.5)
    assert sa.nn.SynthesizerAttention(8, mode="random", mix=True, scale=0.5).scale == 0.5
    assert sa.nn.SynthesizerAttention(8, mode="factorized_random", rank=3).r1.shape[-1] == 3
    with pytest.raises(ValueError, match="max_len"):
        sa.nn.SynthesizerAttention(4, mode="random")(v, v, v)
    with pytest.raises(ValueError, match="S=5 columns"):
        synthesizer_attention(torch.randn(5, 4), v)
    with pytest.raises(ValueError, match="N == S"):
        synthesizer_attention(torch.randn(4, 5), v, causal=True)
    with pytest.raises(ValueError, match="dot_weight"):
        synthesizer_attention(torch.randn(5, 5), v, q=torch.randn(1, 2, 5, 3), k=v, dot_weight=1.5)
    with pytest.raises(ValueError, match="needs q and k"):
        synthesizer_attention(torch.randn(5, 5), v, dot_weight=0.5)
    with pytest.raises(TypeError, match="key_padding_mask"):
        synthesizer_attention(torch.randn(5, 5), v, key_padding_mask=torch.zeros(1, 5))


# ----------------------------------------------------------------------------- modules: Performer, smoke


def test_performer_module_redraws_in_training_only():
    m = sa.nn.PerformerAttention(8, 16, redraw_interval=2, seed=5)
    q, k, v = make_qkv(1, 2, 2, 10, 10, 8, requires_grad=False)
    p0 = m.feature_map.projection.clone()
    m(q, k, v)
    m(q, k, v)
    assert torch.equal(m.feature_map.projection, p0)
    m(q, k, v)  # third call: redraw
    assert not torch.equal(m.feature_map.projection, p0)
    m.eval()
    p1 = m.feature_map.projection.clone()
    for _ in range(4):
        m(q, k, v)
    assert torch.equal(m.feature_map.projection, p1)
    torch.testing.assert_close(m(q, k, v), sa.linear_attention(q, k, v, feature_map=m.feature_map))
    assert torch.equal(sa.nn.PerformerAttention(8, 16, seed=5).feature_map.projection, p0)


MODULES = {
    "performer": lambda: sa.nn.PerformerAttention(16),
    "performer-causal": lambda: sa.nn.PerformerAttention(16, causal=True),
    "linformer": lambda: sa.nn.LinformerAttention(64, 8),
    "compressed": lambda: sa.nn.CompressedAttention(3, 2, head_dim=16),
    "nystrom": lambda: sa.nn.NystromAttention(8),
    "synthesizer": lambda: sa.nn.SynthesizerAttention(64, head_dim=16, mix=True, causal=True),
}


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_module_smoke(name, dtype):
    m = MODULES[name]().to(dtype)
    q, k, v = make_qkv(2, 4, 2, 50, 50, 16, dtype=dtype)
    kpm = padding_mask(2, 50)
    out = m(q, k, v, key_padding_mask=kpm)
    assert out.shape == (2, 4, 50, 16) and out.dtype == dtype and torch.isfinite(out).all()
    out.float().backward(torch.randn(out.shape))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    if dtype == torch.float32:  # half precision stays close to the float32 computation
        m32 = m.float().requires_grad_(False)
        out32 = m32(q.detach(), k.detach(), v.detach(), key_padding_mask=kpm)
        m16 = MODULES[name]().to(torch.bfloat16)
        m16.load_state_dict(m32.state_dict())
        m16.requires_grad_(False)
        out16 = m16(q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(), key_padding_mask=kpm)
        assert float((out16.float() - out32).abs().max()) < 0.1 * float(out32.abs().max()) + 0.05


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_module_nan_in_query_propagates(name, dtype):
    """A NaN in one query makes its output row NaN (PyTorch's fused CPU kernel would give zeros there,
    pytorch#141128)."""
    m = MODULES[name]().to(dtype)
    q, k, v = make_qkv(2, 4, 2, 50, 50, 16, dtype=dtype, requires_grad=False)
    q[1, 2, 7, 3] = float("nan")
    out = m(q, k, v)
    assert bool(out[1, 2, 7].isnan().all()), f"row with a NaN query: {out[1, 2, 7]}"


@pytest.mark.parametrize("causal", [False, True])
def test_synthesizer_empty_lengths(causal):
    """N = 0 gives an empty output, S = 0 zeros (RELIABILITY.md), with gradients, also through the layer."""
    syn = sa.nn.SynthesizerAttention(12, mode="random", causal=causal)
    q, k, v = make_qkv(1, 2, 2, 0, 0, 4)
    out = syn(q, k, v)
    assert out.shape == (1, 2, 0, 4)
    out.sum().backward()
    if not causal:  # causal needs N == S
        q, k, v = make_qkv(1, 2, 2, 3, 0, 4)
        out = sa.nn.SynthesizerAttention(12, mode="random", mix=True)(q, k, v)  # q meets the (empty) keys
        assert torch.equal(out, torch.zeros(1, 2, 3, 4))
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q))
    mha = sa.nn.MultiheadAttention(8, 2, attention=sa.nn.SynthesizerAttention(12, head_dim=4, causal=causal))
    x = torch.randn(1, 0, 8)
    assert mha(x, x, x, need_weights=False)[0].shape == (1, 0, 8)


@pytest.mark.parametrize("dirty_at", ["keys", "queries"])
@pytest.mark.parametrize("name", ["nystrom", "synthesizer-mix"])
def test_non_finite_values_at_padded_positions_change_nothing(name, dirty_at):
    """inf/NaN in the keys and values of padded positions change neither the real rows' outputs nor any
    gradient of real positions. Nyström's self-attention also leaves padded queries out of its query
    landmarks: inf there changes no real row's output (the padded row itself, and so the backward through
    the shared landmarks, do see it)."""
    if name == "synthesizer-mix" and dirty_at == "queries":
        pytest.skip("Synthesizer has no query landmarks: a query only reaches its own row")
    q, k, v = make_qkv(2, 2, 2, 20, 20, 8, dtype=torch.float64, requires_grad=False)
    kpm = padding_mask(2, 20)
    if name == "nystrom":
        def fn(a, b, c):
            return nystrom_attention(a, b, c, num_landmarks=4, key_padding_mask=kpm)
    else:
        logits = torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

        def fn(a, b, c):
            return synthesizer_attention(logits, c, q=a, k=b, dot_weight=0.5, key_padding_mask=kpm)
    g = torch.randn(2, 2, 20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    real = ~kpm
    results = []
    for dirty in (False, True):
        a, b, c = (t.clone() for t in (q, k, v))
        if dirty:
            pad = kpm[:, None, :, None].expand_as(b)
            if dirty_at == "keys":
                b[pad], c[pad] = float("nan"), float("inf")
            else:
                a[pad] = float("inf")
        a, b, c = (t.requires_grad_() for t in (a, b, c))
        out = fn(a, b, c)
        grads = torch.autograd.grad(out, (a, b, c), g * real[:, None, :, None]) if dirty_at == "keys" else []
        results.append([out.detach()] + list(grads))
    for i, name_ in enumerate(("out", "dq", "dk", "dv")[:len(results[0])]):
        clean, dirty = (r[i].transpose(1, 2)[real] for r in results)
        torch.testing.assert_close(dirty, clean, atol=1e-12, rtol=1e-12, msg=lambda m, n=name_: f"{n}: {m}")
