"""InformerEncoder (ProbSparse + distilling), build_attention, and the forecasting example."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

import sparse_attention as sa


@pytest.mark.parametrize(("length", "layers", "expected"), [(97, 3, 25), (96, 2, 48), (5, 3, 2), (1, 2, 1)])
def test_distilling_halves_the_length_between_layers(length, layers, expected):
    enc = sa.nn.InformerEncoder(16, 2, layers, dim_feedforward=32, dropout=0.0)
    x = torch.randn(2, length, 16)
    y = enc(x)
    assert y.shape == (2, expected, 16)
    y.square().sum().backward()
    assert all(p.grad is not None for p in enc.parameters()), "a parameter gets no gradient"
    assert sa.nn.InformerEncoder(16, 2, layers, distil=False)(x).shape == x.shape


def test_every_query_active_layer_equals_full_attention_layer():
    """With u >= N every query attends all keys: the ProbSparse layer equals the same layer with full attention."""
    torch.manual_seed(0)
    layer = sa.nn.InformerEncoderLayer(16, 2, 32, dropout=0.0, factor=100).eval()
    full = sa.nn.InformerEncoderLayer(16, 2, 32, dropout=0.0).eval()
    full.attn = sa.nn.MultiheadAttention(16, 2)  # same parameters, full attention
    full.load_state_dict(layer.state_dict())
    x = torch.randn(3, 20, 16)
    torch.testing.assert_close(layer(x), full(x), atol=2e-6, rtol=2e-6)


def test_build_attention_by_name_and_errors():
    m = sa.nn.build_attention("sliding_window", 32, 4, window=3, dropout=0.0)
    assert isinstance(m, sa.nn.MultiheadAttention)
    x = torch.randn(2, 10, 32)
    out, _ = m(x, x, x, need_weights=False)
    ref = sa.nn.MultiheadAttention(32, 4, attention=sa.SlidingWindow(3))
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(out, ref(x, x, x, need_weights=False)[0])
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        sa.nn.build_attention("nope", 32, 4)
    with pytest.raises(ValueError, match=r"unknown option.*'wndow'.*valid.*window"):
        sa.nn.build_attention("sliding_window", 32, 4, wndow=3)


@pytest.mark.slow
def test_forecasting_example_learns():
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "examples" / "informer_forecast.py"), "--steps", "150"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    ours, last, season = (float(part.split()[-1]) for part in line.split("|"))
    assert ours < last and ours < season, line
