"""sa.nn.WindowAttention2d against the loop-over-windows reference in the package; the shifted-window mask."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_baseline

import sparse_attention as sa
from sparse_attention.nn.window2d import reference_window_attention_2d


def _module(window, shift, dtype=torch.float64, dim=8, heads=2):
    torch.manual_seed(0)
    m = sa.nn.WindowAttention2d(dim, heads, window, shift).to(dtype).eval()
    with torch.no_grad():
        m.relative_position_bias_table.normal_()  # Swin's init (std 0.02) would hide an indexing bug
    return m


CASES = [  # (H, W, window, shift)
    (6, 6, 3, 0),
    (6, 6, 3, 1),
    (7, 9, 3, 2),  # odd sizes: padded
    (5, 4, 4, 2),  # smaller than two windows
    (2, 3, 4, 3),  # smaller than one window
    (8, 6, (4, 2), (2, 1)),  # rectangular window
]


@pytest.mark.parametrize("H, W, window, shift", CASES, ids=[f"H{h}-W{w}-win{k}-shift{s}" for h, w, k, s in CASES])
def test_matches_loop_reference_forward_and_grads(H, W, window, shift):
    m = _module(window, shift)
    x = torch.randn(2, H, W, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, H, W, 8, dtype=torch.float64)
    params = [x, *m.parameters()]
    names = ["x", *(n for n, _ in m.named_parameters())]
    out = m(x)
    grads = torch.autograd.grad(out, params, g)
    ref = reference_window_attention_2d(m, x)
    ref_grads = torch.autograd.grad(ref, params, g)
    torch.testing.assert_close(out, ref, msg=lambda s: f"out: {s}")
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, msg=lambda s, name=name: f"d{name}: {s}")


def test_float32_within_the_tolerance_rule():
    m64 = _module(3, 1)
    x = torch.randn(2, 7, 5, 8, dtype=torch.float64)
    golden = reference_window_attention_2d(m64, x).detach()
    m32 = _module(3, 1, dtype=torch.float32)
    with torch.no_grad():
        assert_within_baseline("out", m32(x.float()), reference_window_attention_2d(m32, x.float()), golden)


def test_shifted_windows_do_not_mix_wrapped_regions():
    """Window 3, shift 2 on 6x6: after the roll, original rows/cols {0, 1} wrap into the last window,
    next to the bottom-right token (5, 5), which they must not attend; they still attend each other."""
    m = _module(3, 2)
    x = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    y = x.clone()
    y[0, 0, 0] += 3.0
    out_x, out_y = m(x), m(y)
    torch.testing.assert_close(out_x[0, 5, 5], out_y[0, 5, 5], rtol=0, atol=0)
    # ...while the top-left token does reach its neighbour in the same (unwrapped) region
    assert not torch.allclose(out_x[0, 0, 1], out_y[0, 0, 1])
    mask = m.window_mask(6, 6)
    assert mask.shape == (4, 9, 9) and not mask[-1].all() and mask[0].all()
    unshifted = _module(3, 0)
    torch.testing.assert_close(unshifted(x)[0, 5, 5], unshifted(y)[0, 5, 5], rtol=0, atol=0)


def test_padding_is_never_attended():
    """A 5x5 map with window 4 is padded to 8x8; no mask row lets a padded key in (checked against the
    padding rolled by the shift), and the output equals the reference, which excludes padding by index."""
    m = _module(4, 2)
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    out = m(x[:, :5, :5])
    assert out.shape == (1, 5, 5, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_window_attention_2d(m, x[:, :5, :5]))
    mask = m.window_mask(5, 5)
    Hp = 8
    valid = torch.zeros(Hp, Hp, dtype=torch.bool)
    valid[:5, :5] = True
    rolled = torch.roll(valid, (-2, -2), (0, 1)).reshape(2, 4, 2, 4).transpose(1, 2).reshape(4, 16)
    assert not (mask & ~rolled[:, None, :]).any(), "a padded key is attendable"


def test_state_dict_names_follow_swin():
    m = sa.nn.WindowAttention2d(8, 2, 7)
    assert set(m.state_dict()) == {"relative_position_bias_table", "relative_position_index", "qkv.weight",
                                   "qkv.bias", "proj.weight", "proj.bias"}
    assert m.relative_position_bias_table.shape == (13 * 13, 2)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dim=8, num_heads=3, window_size=4), ValueError, "divisible"),
    (dict(dim=8, num_heads=2, window_size=4, shift_size=4), ValueError, "shift_size"),
    (dict(dim=8, num_heads=2, window_size=0), ValueError, "window_size"),
    (dict(dim=8, num_heads=2, window_size="4"), TypeError, "window_size"),
    (dict(dim=8, num_heads=2, window_size=4, attn_drop=2.0), ValueError, "dropout"),
])
def test_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sa.nn.WindowAttention2d(**kwargs)


def test_forward_validation():
    m = sa.nn.WindowAttention2d(8, 2, 4)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 4, 4, 7))
    with pytest.raises(ValueError, match="H, W"):
        m(torch.randn(1, 0, 4, 8))
