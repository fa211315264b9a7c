"""The library under PyTorch's own machinery: torch.compile, autocast, second-order gradients, hooks, state."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa


@pytest.mark.parametrize("name", ["lsh", "routing", "sinkhorn", "topk"])
def test_torch_compile_runs_the_native_kernels_eagerly(name):
    """torch.compile (backend "eager": no C++ compilation) around layers whose mechanisms call the native C
    kernels: the same output and gradients as eager. Dynamo used to trace into the pointer-passing wrappers
    and break the graph there, freeing tensors whose addresses the C call then read (a segfault)."""
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(32, 4, attention=name, batch_first=True).eval()
    x = torch.randn(1, 64, 32)
    outs = []
    for fn in (torch.compile(m, backend="eager"), m):
        xi = x.clone().requires_grad_()
        out = fn(xi, xi, xi, need_weights=False)[0]
        out.sum().backward()
        outs.append((out.detach(), xi.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_topk_second_order_gradients_equal_the_reference():
    """TopK's backward builds a graph when one is asked for (create_graph=True): second derivatives equal
    the dense reference's over the kept pairs, float64 (reusing the forward's weights, which carry no graph,
    gave dq off by 2.25); gradgradcheck passes."""
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True,
                           generator=torch.Generator().manual_seed(i)) for i in range(3))
    pattern = sa.TopK(4) & sa.Causal()
    mask = sa.explain(q.detach(), k.detach(), pattern)

    def hvp(f):
        (gq,) = torch.autograd.grad(f(q, k, v).pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(gq.pow(2).sum(), (q, k, v))

    got = hvp(lambda a, b, c: sa.attention(a, b, c, pattern))
    want = hvp(lambda a, b, c: sa.reference_attention(a, b, c, mask))
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.autograd.gradgradcheck(lambda a, b, c: sa.attention(a, b, c, sa.TopK(3)), (q, k, v))


def test_block_sparse_second_order_raises():
    """The fused kernel's backward has no derivative: asking for a graph of the block-sparse backward raises
    a clear error rather than giving none."""
    q, k, v = (torch.randn(1, 1, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = sa.attention(q, k, v, sa.SlidingWindow(2), backend="blocksparse")
    with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
        torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)


@pytest.mark.parametrize("attention", [sa.ProbSparse(), sa.ProbSparse(causal=True), "linformer", "lsh", "performer"],
                         ids=["probsparse", "probsparse-causal", "linformer", "lsh", "performer"])
@pytest.mark.parametrize("N", [4, 48])  # ProbSparse's layer attends the inputs when H·u < Hkv·D (N = 4 here)
def test_autocast_bf16(attention, N):
    """Under torch.autocast the layer runs forward and backward (the fused ProbSparse layer mixed its float32
    sums with autocast's bf16 projections and failed) and stays near the float32 result."""
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(32, 4, attention=attention, batch_first=True).eval()
    x = torch.randn(2, N, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, x, x, need_weights=False)[0]
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    with torch.no_grad():
        ref = m(x, x, x, need_weights=False)[0]
    # content-based selections can flip under bf16 rounding: a loose bound on the mean error only
    assert float((out.float() - ref).abs().mean()) < 0.1 * float(ref.abs().mean()) + 0.02


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_backward_with_transposed_inputs(feature_map, causal):
    """Inputs transposed from (B, N, H, D), with B = 1 so that they stay views, in float64 (the PyTorch
    cores): the same gradients as contiguous inputs (FAVOR+'s backward wrote into an empty_like of the
    transposed query and failed on a view)."""
    fm = sa.approx.FavorPlus(8, seed=0) if feature_map == "favor" else "elu"
    base = [torch.randn(1, 64, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            for i in range(3)]
    grads = []
    for make in (lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2).contiguous()):
        q, k, v = (make(t).requires_grad_() for t in base)
        sa.linear_attention(q, k, v, feature_map=fm, causal=causal).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_performer_redraw_schedule_and_seed_survive_a_state_dict_round_trip():
    """A PerformerAttention loaded from a state_dict redraws when the saved one would have, with the saved
    seed's sequence (its call count and its feature map's seed were not saved)."""
    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    m = sa.nn.PerformerAttention(8, redraw_interval=2, seed=3).train()
    for _ in range(3):
        m(q, k, v)
    m2 = sa.nn.PerformerAttention(8, redraw_interval=2, seed=7).train()
    m2.load_state_dict(m.state_dict())
    for _ in range(4):  # crosses a redraw
        torch.testing.assert_close(m2(q, k, v), m(q, k, v), atol=0, rtol=0)


def test_reformer_layer_with_a_full_backward_hook():
    """A full backward hook hands the layer each argument as its own tensor object: shared-QK (Reformer)
    self-attention still recognises key as query (it raised "call with key the same tensor as query"), and
    the hook sees the gradients; another tensor as key is still refused."""
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(32, 4, attention="reformer", batch_first=True)
    x = torch.randn(1, 64, 32, requires_grad=True)
    want = m(x, x, x, need_weights=False)[0]
    seen = []
    m.register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0].shape))
    out = m(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    out.sum().backward()
    assert seen == [out.shape]
    with pytest.raises(ValueError, match="key the same tensor as query"):
        m(x, x.clone(), x, need_weights=False)


@pytest.mark.parametrize("attention", ["lsh", "routing", "sinkhorn", "reformer", "linear", "performer"])
def test_second_order_through_a_first_order_kernel_raises(attention):
    """The native and fused kernels' backwards are not differentiable: asking for a graph of them
    (create_graph=True, e.g. a gradient penalty) raises, where once_differentiable let the second
    derivative come out None (with allow_unused=True) or "not used in the graph"."""
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(32, 4, attention=attention, batch_first=True)
    x = torch.randn(1, 48, 32, requires_grad=True)
    out = m(x, x, x, need_weights=False)[0]
    with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(m(x, x, x, need_weights=False)[0].pow(2).sum(), x)  # first order as before
    assert torch.isfinite(g).all()
