"""sa.nn.AttentionPooling: additive attention pooling over time (or per feature), with padding."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa


def _reference(pool, x, key_padding_mask=None):
    """The formula written step by step, one sequence at a time, float64."""
    pooled, weights = [], []
    for b in range(x.shape[0]):
        keep = torch.ones(x.shape[1], dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask[b]
        xb = x[b, keep].double()  # (T', C)
        u = torch.tanh(xb @ pool.proj.weight.double().T + pool.proj.bias.double())
        e = u @ pool.score.weight.double().T  # (T', 1) or (T', C)
        if pool.score.bias is not None:
            e = e + pool.score.bias.double()
        a = torch.softmax(e, dim=0) if xb.shape[0] else e
        full = torch.zeros(x.shape[1], a.shape[1], dtype=torch.float64)
        full[keep] = a
        pooled.append((a * xb).sum(0) if xb.shape[0] else torch.zeros(x.shape[2], dtype=torch.float64))
        weights.append(full.squeeze(-1) if pool.pool == "time" else full)
    return torch.stack(pooled), torch.stack(weights)


@pytest.mark.parametrize("pool", ["time", "feature"])
def test_matches_reference_with_padding(pool):
    torch.manual_seed(0)
    m = sa.nn.AttentionPooling(6, 5, pool=pool)
    x = torch.randn(3, 7, 6, requires_grad=True)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2] = True  # fully padded sequence
    pooled, w = m(x, key_padding_mask=kpm)
    ref_p, ref_w = _reference(m, x.detach(), kpm)
    assert pooled.shape == (3, 6) and w.shape == ((3, 7) if pool == "time" else (3, 7, 6))
    torch.testing.assert_close(pooled.double(), ref_p)
    torch.testing.assert_close(w.double(), ref_w)
    assert (pooled[2] == 0).all() and (w[2] == 0).all(), "fully padded row must give 0"
    assert (w[0, 4:] == 0).all(), "padding (True) received weight"
    pooled.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[2] == 0).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_weights_sum_to_one_and_polarity():
    torch.manual_seed(0)
    m = sa.nn.AttentionPooling(4)
    x = torch.randn(2, 5, 4)
    kpm = torch.tensor([[False, False, True, True, True], [False] * 5])
    pooled, w = m(x, kpm)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    y = x.clone()
    y[0, 2:] = 100.0  # padded steps cannot change the result
    torch.testing.assert_close(m(y, kpm)[0], pooled, rtol=0, atol=0)


def test_validation():
    with pytest.raises(ValueError, match="pool"):
        sa.nn.AttentionPooling(4, pool="channel")
    with pytest.raises(ValueError, match="dim"):
        sa.nn.AttentionPooling(0)
    m = sa.nn.AttentionPooling(4)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(torch.randn(2, 5, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 5, 4), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("pool", ["time", "feature"])
def test_empty_sequence_and_non_finite_padding(pool):
    """T = 0 pools to 0 (like a fully padded sequence); inf/NaN at padded steps change neither the pooled
    vector nor the gradients of the real steps (they are zeroed before scoring)."""
    m = sa.nn.AttentionPooling(6, pool=pool).double()
    pooled, weights = m(torch.randn(2, 0, 6, dtype=torch.float64))
    assert torch.equal(pooled, torch.zeros(2, 6, dtype=torch.float64)) and weights.shape[:2] == (2, 0)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    kpm = torch.tensor([[False, False, True, False, True], [False] * 5])
    dirty = x.clone()
    dirty[0, 2], dirty[0, 4] = float("inf"), float("nan")
    outs = []
    for inp in (x, dirty):
        inp = inp.clone().requires_grad_()
        pooled, _ = m(inp, kpm)
        pooled.backward(torch.ones_like(pooled))
        outs.append((pooled.detach(), inp.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[1][1][0, 2], torch.zeros(6, dtype=torch.float64)), "a padded step's gradient is 0"


def test_bias_must_be_a_bool():
    with pytest.raises(TypeError, match="bias must be a bool, got 'no'"):
        sa.nn.AttentionPooling(6, bias="no")
