"""Modules of the content-based mechanisms (Reformer shared-QK LSH, Routing with EMA centroids, Sinkhorn)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_baseline, make_qkv, padding_mask

import sparse_attention as sa
from sparse_attention.dynamic import LSH, Routing, explain, sinkhorn, sinkhorn_attention
from sparse_attention.dynamic.routing import update_centroids
from sparse_attention.nn.content_based import ReformerAttention, RoutingAttention, SinkhornAttention


def test_reformer_attention_is_shared_qk_lsh_on_normalised_keys():
    qk, _, v = make_qkv(2, 2, 2, 40, 40, 8, seed=40)
    mod = ReformerAttention(4, n_hashes=2, seed=3)
    out = mod(qk, v)
    k = torch.nn.functional.normalize(qk, dim=-1)
    mech = LSH(4, 2, seed=3, exclude_self=True, shared_qk=True)
    torch.testing.assert_close(out, sa.attention(qk, k, v, mech), atol=0, rtol=0)
    kept = explain(qk, k, mech)
    torch.testing.assert_close(out, sa.reference_attention(qk, k, v, kept), atol=2e-6, rtol=2e-6)
    out.sum().backward()
    assert qk.grad is not None and torch.isfinite(qk.grad).all()
    # the keys are the normalised queries, so hashing them once buckets the queries the same way
    assert torch.equal(kept, explain(qk, k, LSH(4, 2, seed=3, exclude_self=True)))


def test_reformer_key_normalisation_gradient_in_float32():
    """float32 (the native backward on CPU): the closed-form gradient against autograd through F.normalize in
    float32, both against float64 (the tolerance rule); a zero row is divided by eps, not by its norm."""
    from sparse_attention.nn.content_based import _UnitRows

    gen = torch.Generator().manual_seed(7)
    x64 = torch.randn(2, 3, 70, 64, generator=gen, dtype=torch.float64)
    x64[0, 0, 0] = 0.0  # (batch entry 0 is left out of the tolerance rule below)
    g64 = torch.randn(2, 3, 70, 64, generator=gen, dtype=torch.float64)
    grads = {}
    for name, fn, dtype in (("ours", _UnitRows.apply, torch.float32),
                            ("lp", lambda t: torch.nn.functional.normalize(t, dim=-1), torch.float32),
                            ("golden", lambda t: torch.nn.functional.normalize(t, dim=-1), torch.float64)):
        x = x64.to(dtype).requires_grad_()
        (grads[name],) = torch.autograd.grad(fn(x), x, g64.to(dtype))
    rows = slice(1, None)  # the zero row's gradient (~1e12) would set every tolerance: checked on its own
    assert_within_baseline("dx", grads["ours"][rows], grads["lp"][rows], grads["golden"][rows], grad=True)
    torch.testing.assert_close(grads["ours"][0, 0, 0], g64[0, 0, 0].float() / 1e-12, rtol=1e-6, atol=0)


def test_routing_attention_updates_centroids_only_in_training():
    q, k, v = make_qkv(2, 2, 2, 48, 48, 8, seed=41, requires_grad=False)
    mod = RoutingAttention(4, 8, 2, decay=0.5)
    before = mod.centroids.clone()
    mod.eval()
    out_eval = mod(q, k, v)
    assert torch.equal(mod.centroids, before), "eval mode must not move the centroids"
    torch.testing.assert_close(out_eval, sa.attention(q, k, v, Routing(before)), atol=0, rtol=0)
    mod.train()
    mod(q, k, v)
    assert not torch.equal(mod.centroids, before), "training mode moves the centroids"
    state = mod.state_dict()
    assert "centroids" in state
    other = RoutingAttention(4, 8, 2, seed=9)
    other.load_state_dict(state)
    other.eval()
    torch.testing.assert_close(other(q, k, v), mod.eval()(q, k, v), atol=0, rtol=0)


def test_sinkhorn_module_soft_in_training_hard_in_eval_and_learns_the_sort():
    q, k, v = make_qkv(2, 2, 2, 30, 30, 8, seed=42)
    mod = SinkhornAttention(8, 2, block=5)
    out = mod(q, k, v)
    out.square().sum().backward()
    assert mod.sort_q.grad is not None and mod.sort_q.grad.abs().sum() > 0, "the sorting network gets no gradient"
    mod.eval()
    with torch.no_grad():
        p = sinkhorn(mod.block_scores(k), mod.n_iters, temperature=mod.temperature, hard=True)
        expected = sinkhorn_attention(q, k, v, p, block=5)
        torch.testing.assert_close(mod(q, k, v), expected, atol=0, rtol=0)
    assert bool(((p == 0) | (p == 1)).all()), "eval mode sorts hard"


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_block_scores_are_the_block_means_scored(causal):
    """The sorting scores from a loop over blocks (each block's mean over its real keys; causal: row i scored
    from block i - 1's mean, block 0 from zeros) through the two sort projections, value and the gradients
    of k and both projections, in float64, with a padding mask and a cut-short last block."""
    B, H, N, D, block = 2, 3, 23, 4, 5
    mod = SinkhornAttention(D, H, block=block, causal=causal).double()
    k = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(44), requires_grad=True)
    kpm = padding_mask(B, N)
    g = torch.randn(B, H, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(45))
    keep = ~kpm
    means = []
    for i in range(5):
        rows = keep[:, i * block:(i + 1) * block].to(k.dtype)  # (B, ≤ block)
        total = (k[:, :, i * block:(i + 1) * block] * rows[:, None, :, None]).sum(2)
        means.append(total / rows.sum(-1).clamp_min(1)[:, None, None])
    summary = torch.stack(means, 2)  # (B, H, nb, D)
    query_side = torch.cat([torch.zeros_like(summary[:, :, :1]), summary[:, :, :-1]], 2) if causal else summary
    want = (query_side @ mod.sort_q) @ (summary @ mod.sort_k).transpose(-1, -2) * D**-0.5
    got = mod.block_scores(k, kpm)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    params = (k, mod.sort_q, mod.sort_k)
    for name, a, b in zip(("dk", "dsort_q", "dsort_k"), torch.autograd.grad(got, params, g),
                          torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("train", [True, False])
def test_sinkhorn_module_ignores_non_finite_padded_keys_and_values(train):
    """The module's sorting scores leave padded keys out too: inf or NaN at padded positions changes neither
    the output nor the gradients (the block sums once multiplied padded keys by 0, and NaN·0 is NaN)."""
    q, k, v = make_qkv(1, 2, 2, 14, 14, 8, seed=46, requires_grad=False)
    kpm = torch.zeros(1, 14, dtype=torch.bool)
    kpm[0, 11:] = True
    mod = SinkhornAttention(8, 2, block=4).train(train)
    g = torch.randn(1, 2, 14, 8, generator=torch.Generator().manual_seed(47))

    def run(kx, vx):
        x = [t.clone().requires_grad_() for t in (q, kx, vx)]
        out = mod(*x, key_padding_mask=kpm)
        return out, torch.autograd.grad(out, x, g)

    base = run(k, v)
    pad = kpm[:, None, :, None].expand_as(k)
    for junk in (float("inf"), float("nan")):
        out, grads = run(torch.where(pad, junk, k), torch.where(pad, junk, v))
        assert torch.equal(out, base[0]), f"output changed with {junk} at padded positions"
        for name, a, b in zip(("dq", "dk", "dv"), grads, base[1], strict=True):
            assert torch.equal(a, b), f"{name} changed with {junk} at padded positions"


def test_causal_modules_ignore_the_future():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, seed=43, requires_grad=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 3.0
    v2[:, :, 20:] -= 2.0
    sink = SinkhornAttention(8, 2, block=5, causal=True)
    for mode in (True, False):
        sink.train(mode)
        torch.testing.assert_close(sink(q, k2, v2)[:, :, :20], sink(q, k, v)[:, :, :20], atol=0, rtol=0)
    rout = RoutingAttention(3, 8, 2, causal=True).eval()
    out = rout(q, k, v)
    kept = explain(q, k, Routing(rout.centroids, causal=True))
    assert not bool((kept & ~sa.Causal().mask(40, 40)).any())
    torch.testing.assert_close(rout(q, k, v2)[:, :, :20], out[:, :, :20], atol=0, rtol=0)


def test_reformer_key_normalisation_matches_f_normalize_with_its_gradient():
    """ReformerAttention normalises the keys with a closed-form backward; it equals F.normalize, zero rows too."""
    from sparse_attention.nn.content_based import _UnitRows

    x = torch.randn(2, 3, 9, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x[0, 0, 0] = 0.0  # divided by eps, not by its norm
        x[1, 2, 3] = 1e-14
    g = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    ours = _UnitRows.apply(x)
    (d_ours,) = torch.autograd.grad(ours, x, g)
    ref = torch.nn.functional.normalize(x, dim=-1)
    (d_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(ours, ref, rtol=1e-15, atol=0)
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("make", "exc", "match"), [
    (lambda: SinkhornAttention(8, 2, 4, causal="no"), TypeError, "causal must be a bool, got 'no'"),
    (lambda: SinkhornAttention(8, 2, 4, temperature=True), TypeError, "temperature"),
    (lambda: SinkhornAttention(8, 2, 4, temperature=0.0), ValueError, "temperature must be a positive finite"),
    (lambda: RoutingAttention(4, 8, 2, decay=2.0), ValueError, "decay must be a number in"),
    (lambda: RoutingAttention(4, 8, 2, decay=float("nan")), ValueError, "decay"),
    (lambda: RoutingAttention(4, 8, 2, capacity=0), ValueError, "capacity must be >= 1"),
    (lambda: RoutingAttention(4, 8, 2, causal=1), TypeError, "causal must be a bool"),
    (lambda: RoutingAttention(4, 8, 2, seed=2**70), ValueError, "seed"),
    (lambda: ReformerAttention(4, causal="yes"), TypeError, "causal"),
])
def test_module_configurations_are_checked(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("name", ["routing", "sinkhorn"])
def test_module_inputs_are_checked_before_computing(name):
    """Bad inputs give the front end's ValueError/TypeError naming what is wrong (they were RuntimeErrors from
    deep inside, or silently accepted: float64 q with float32 k, v); N = 0 gives an empty output."""
    m = RoutingAttention(4, 8, 2) if name == "routing" else SinkhornAttention(8, 2, 4)
    q, k, v = make_qkv(2, 2, 2, 16, 16, 8, requires_grad=False)
    bad = [((q, k, v[:, :, :15]), {}, ValueError, "same length"),
           ((q.double(), k, v), {}, TypeError, "one dtype"),
           ((q[..., :4], k[..., :4], v[..., :4]), {}, ValueError, "head_dim=8"),
           ((q[:, :1], k[:, :1], v[:, :1]), {}, ValueError, "num_heads=2"),
           ((q, k, v), {"key_padding_mask": torch.zeros(2, 17, dtype=torch.bool)}, ValueError, r"\(B, S\)"),
           ((q, k, v), {"key_padding_mask": torch.zeros(2, 16)}, TypeError, "torch.bool")]
    for args, kwargs, exc, match in bad:
        with pytest.raises(exc, match=match):
            m(*args, **kwargs)
    empty = make_qkv(1, 2, 2, 0, 0, 8)
    out = m(*empty)
    assert out.shape == (1, 2, 0, 8)
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routing_module_in_half_precision_trains(dtype):
    """A RoutingAttention converted to bf16/fp16 moves its centroids in training mode (the k-means step
    runs in float32 and stores the result in the centroids' dtype; it failed with a dtype mismatch)."""
    m = RoutingAttention(4, 8, 2).to(dtype).train()
    q, k, v = make_qkv(2, 2, 2, 24, 24, 8, dtype=dtype)
    before = m.centroids.clone()
    out = m(q, k, v)
    out.float().sum().backward()
    assert m.centroids.dtype == dtype and not torch.equal(m.centroids, before)
    ref = update_centroids(before.float(), torch.cat([q, k], 2).detach().float(), decay=m.decay).to(dtype)
    torch.testing.assert_close(m.centroids, ref, atol=0, rtol=0)
