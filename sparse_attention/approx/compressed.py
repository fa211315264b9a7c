"""Memory-compressed attention: a strided convolution shortens K and V, then softmax attention.

    K' = Conv1d_k(K), V' = Conv1d_v(V) along the sequence (kernel w, stride s);  out = softmax(Q K'ᵀ·scale) V'

Liu et al., "Generating Wikipedia by Summarizing Long Sequences", ICLR 2018, arXiv:1801.10198
(section 4.2.2, memory-compressed attention; kernel 3, stride 3 there).

Padding rule (odd lengths). With S keys the compressed length is S' = ceil(max(S - w, 0) / s) + 1,
and the sequence is zero-padded on the right to (S' - 1)·s + w: the last window is complete and
ends at or after the last key (e.g. S=10, w=3, s=3 -> S'=4, padded to 12). With s <= w every key
lands in some window; s > w skips the keys between windows, as a strided convolution does. Padded keys
(``key_padding_mask``) are set to 0 before the convolution, like the right padding; a compressed
position whose window holds no real key is masked. No causal mode: a window mixes future keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_int, check_key_padding_mask, check_qkv, check_scale
from ..reference import zeros_from
from ._common import compute_dtype, sdpa, softmax_attention, zero_padded

__all__ = ["compressed_length", "compress", "compressed_attention", "reference_compressed_attention"]


def compressed_length(S: int, kernel_size: int, stride: int) -> int:
    """S' = ceil(max(S - kernel_size, 0) / stride) + 1 (0 for S = 0)."""
    return 0 if S == 0 else math.ceil(max(S - kernel_size, 0) / stride) + 1


def compress(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, stride: int) -> torch.Tensor:
    """x (B, H, S, Din) -> (B, H, S', Dout) with a Conv1d weight (Dout, Din, w) shared by all heads."""
    B, H, S, Din = x.shape
    w = weight.shape[-1]
    Sc = compressed_length(S, w, stride)
    pad = (Sc - 1) * stride + w - S
    xt = x.reshape(B * H, S, Din).transpose(1, 2)  # (B*H, Din, S)
    y = F.conv1d(F.pad(xt, (0, pad)), weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride=stride)
    # contiguous: SDPA's fused CPU kernel needs a unit last-dim stride, else it falls back to the math path
    return y.transpose(1, 2).contiguous().view(B, H, Sc, -1)  # (B, H, S', Dout)


def _kept(key_padding_mask: torch.Tensor | None, B: int, S: int, w: int, stride: int,
          device: torch.device) -> torch.Tensor | None:
    """(B, 1, 1, S') bool: compressed position holds at least one real key (None: all do). Without padding
    only a stride longer than the kernel can leave a last window past the last key (S=6, w=2, s=3)."""
    Sc = compressed_length(S, w, stride)
    if key_padding_mask is None:
        if (Sc - 1) * stride < S:
            return None
        key_padding_mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    real = F.pad((~key_padding_mask).float()[:, None, :], (0, (Sc - 1) * stride + w - S))  # (B, 1, S+pad)
    return (F.max_pool1d(real, w, stride) > 0)[:, None]  # (B, 1, 1, S')


def _check_conv(name: str, weight: object, bias: object, d_in: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[1] != d_in:
        raise ValueError(f"{name} must be a Conv1d weight of shape (D_out, {d_in}, kernel_size), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{name.replace('weight', 'bias')} must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")


def compressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    stride: int,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q to the strided convolutions of k and v.

    Args:
        q: (B, Hq, N, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv); GQA as in ``sa.attention``.
        k_weight: (D, D, w) Conv1d weight for keys (output dim D so q·k' is defined); v_weight:
            (Dv', Dv, w) for values (same w); biases optional, (D,) and (Dv',).
        stride: s >= 1.
        key_padding_mask: (B, S) bool, True = padding (see the module docstring's padding rule).
        scale: default 1/sqrt(D).

    Returns:
        (B, Hq, N, Dv') in q's dtype; O(N·S/s) time and memory per head. A query whose keys are all
        padding gives 0.
    """
    B, Hq, Hkv, N, S, D, Dv = check_qkv(q, k, v)
    stride = check_int("stride", stride, minimum=1)
    _check_conv("k_weight", k_weight, k_bias, D)
    _check_conv("v_weight", v_weight, v_bias, Dv)
    if k_weight.shape[0] != D:
        raise ValueError(f"k_weight must map keys back to D={D} channels, got D_out={k_weight.shape[0]}")
    w = k_weight.shape[-1]
    if v_weight.shape[-1] != w:
        raise ValueError(f"k_weight and v_weight must share one kernel size, got {w} and {v_weight.shape[-1]}")
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, S, q.device)
    scale = check_scale(scale, D)
    if B == 0 or Hq == 0 or N == 0 or S == 0:
        return zeros_from((B, Hq, N, v_weight.shape[0]), q, k, v)
    dtype = compute_dtype(q.dtype)
    kc = compress(zero_padded(k.to(dtype), key_padding_mask), k_weight, k_bias, stride=stride)
    vc = compress(zero_padded(v.to(dtype), key_padding_mask), v_weight, v_bias, stride=stride)
    keep = _kept(key_padding_mask, B, S, w, stride, q.device)
    return sdpa(q.to(dtype), kc, vc, scale=scale, keep=keep).to(q.dtype)


def reference_compressed_attention(q, k, v, *, k_weight, v_weight, stride, k_bias=None, v_bias=None,
                                   key_padding_mask=None, scale=None):
    """Readable form: pad, compress each window by an explicit sum, mask empty windows, softmax."""
    B, Hkv, S, D = k.shape
    w = k_weight.shape[-1]
    Sc = compressed_length(S, w, stride)
    real = torch.ones(B, S, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    pad = (Sc - 1) * stride + w - S
    kk = torch.cat([k * real[:, None, :, None], k.new_zeros(B, Hkv, pad, D)], 2)
    vv = torch.cat([v * real[:, None, :, None], v.new_zeros(B, Hkv, pad, v.shape[-1])], 2)
    realp = torch.cat([real, torch.zeros(B, pad, dtype=torch.bool)], 1)
    kc, vc, keep = [], [], []
    for j in range(Sc):
        win = slice(j * stride, j * stride + w)
        # Σ_t W[:, :, t] x_{j*s+t}
        kc.append(torch.einsum("oit,bhti->bho", k_weight.to(k.dtype), kk[:, :, win]))
        vc.append(torch.einsum("oit,bhti->bho", v_weight.to(v.dtype), vv[:, :, win]))
        keep.append(realp[:, win].any(1))
    kc, vc = torch.stack(kc, 2), torch.stack(vc, 2)  # (B, Hkv, S', ·)
    if k_bias is not None:
        kc = kc + k_bias.to(kc.dtype)
    if v_bias is not None:
        vc = vc + v_bias.to(vc.dtype)
    keep = torch.stack(keep, 1)[:, None, None, :]  # (B, 1, 1, S')
    scale = check_scale(scale, q.shape[-1])
    return softmax_attention(q, kc, vc, scale=scale, keep=keep)
