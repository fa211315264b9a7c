"""sa.nn.TransformerEncoderLayer / TransformerDecoderLayer: torch's weights load and outputs match.

Tolerance: the project's rule (see tests/test_nn_multihead.py): torch's layer in float64 is the
golden output, torch's float32 run the baseline; ours in float32 must be within 2x the baseline's
error plus the float32 floor. Eval mode (dropout off), with grad enabled so torch takes its
ordinary (not fast-path) code, which is the one we mirror.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_baseline

import sparse_attention as sa

E, H, F = 16, 4, 24


def _to64(t):
    return t.double() if torch.is_tensor(t) and t.is_floating_point() else t


def _compare(ref, ours, args, kwargs):
    ref.eval()
    ours.eval()
    o32 = ref(*args, **kwargs).detach()
    o64 = ref.double()(*map(_to64, args), **{k: _to64(v) for k, v in kwargs.items()}).detach()
    ref.float()
    out = ours(*args, **kwargs).detach()
    assert_within_baseline("out", out, o32, o64)


def _randomise(module):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, batch_first, activation):
    ref = torch.nn.TransformerEncoderLayer(E, H, F, 0.1, activation, batch_first=batch_first, norm_first=norm_first)
    _randomise(ref)
    ours = sa.nn.TransformerEncoderLayer(E, H, F, 0.1, activation, batch_first=batch_first, norm_first=norm_first)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, E)
    if not batch_first:
        x = x.transpose(0, 1)
    kpm = torch.rand(3, 7) < 0.3
    kpm[:, 0] = False
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    for kwargs in (dict(), dict(src_key_padding_mask=kpm), dict(src_mask=causal, is_causal=True)):
        _compare(ref, ours, (x,), kwargs)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_decoder_layer_matches_torch(norm_first, batch_first):
    ref = torch.nn.TransformerDecoderLayer(E, H, F, batch_first=batch_first, norm_first=norm_first, bias=True)
    _randomise(ref)
    ours = sa.nn.TransformerDecoderLayer(E, H, F, batch_first=batch_first, norm_first=norm_first, bias=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    tgt, mem = torch.randn(2, 6, E), torch.randn(2, 9, E)
    if not batch_first:
        tgt, mem = tgt.transpose(0, 1), mem.transpose(0, 1)
    mpm = torch.rand(2, 9) < 0.3
    mpm[:, 0] = False
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    _compare(ref, ours, (tgt, mem), dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mpm))
    _compare(ref, ours, (tgt, mem), dict())


def test_no_bias_layers_load_torch_weights():
    for cls, ours_cls in ((torch.nn.TransformerEncoderLayer, sa.nn.TransformerEncoderLayer),
                          (torch.nn.TransformerDecoderLayer, sa.nn.TransformerDecoderLayer)):
        ref, ours = cls(E, H, F, bias=False), ours_cls(E, H, F, bias=False)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict())


def test_sparse_self_and_cross_attention():
    """The layers hand their mechanisms to MultiheadAttention; a local window keeps far tokens apart."""
    torch.manual_seed(0)
    enc = sa.nn.TransformerEncoderLayer(E, H, F, 0.0, batch_first=True, attention=sa.SlidingWindow(1)).eval()
    x = torch.randn(1, 12, E)
    y = x.clone()
    y[:, -1] += 5  # token 11 is outside the window of token 0..9
    torch.testing.assert_close(enc(x)[:, :10], enc(y)[:, :10], rtol=0, atol=0)
    assert not torch.allclose(enc(x)[:, 10:], enc(y)[:, 10:])

    dec = sa.nn.TransformerDecoderLayer(E, H, F, 0.0, batch_first=True, attention="causal",
                                        cross_attention=sa.SlidingWindow(0)).eval()
    tgt, mem = torch.randn(1, 4, E), torch.randn(1, 4, E)
    mem2 = mem.clone()
    mem2[:, 3] += 5  # only target 3 sees memory position 3
    torch.testing.assert_close(dec(tgt, mem)[:, :3], dec(tgt, mem2)[:, :3], rtol=0, atol=0)
    assert isinstance(dec.multihead_attn.attention, sa.SlidingWindow)


def test_activation_validation():
    with pytest.raises(ValueError, match="activation"):
        sa.nn.TransformerEncoderLayer(E, H, activation="swish")
    with pytest.raises(TypeError, match="activation"):
        sa.nn.TransformerDecoderLayer(E, H, activation=3)
