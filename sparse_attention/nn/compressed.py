"""Memory-compressed attention module (Liu et al., arXiv:1801.10198): strided Conv1d over K and V."""

from __future__ import annotations

import torch

from .._checks import check_bool, check_int, check_scale
from ..approx.compressed import compressed_attention


class CompressedAttention(torch.nn.Module):
    """Attention to K and V shortened by a strided convolution along the sequence.

    Args:
        kernel_size: w, positions per window.
        stride: s; default None = kernel_size (non-overlapping windows, the paper's 3/3).
        head_dim: D (keyword, required): channels of the key convolution (D -> D).
        value_dim: Dv; default head_dim.
        bias: convolution biases (default True).
        scale: default 1/sqrt(D).

    The convolutions (one for K, one for V, shared by all heads) start as mean pooling over the
    window, so an untrained module is attention to window means. Odd lengths: see the padding
    rule in :mod:`sparse_attention.approx.compressed` (S' = ceil(max(S - w, 0) / s) + 1).
    forward(q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), *, key_padding_mask=None)
    -> (B, Hq, N, Dv).
    """

    def __init__(self, kernel_size: int, stride: int | None = None, *, head_dim: int, value_dim: int | None = None,
                 bias: bool = True, scale: float | None = None):
        super().__init__()
        self.kernel_size = check_int("kernel_size", kernel_size, minimum=1)
        self.stride = self.kernel_size if stride is None else check_int("stride", stride, minimum=1)
        D = check_int("head_dim", head_dim, minimum=1)
        Dv = D if value_dim is None else check_int("value_dim", value_dim, minimum=1)
        bias = check_bool("bias", bias)
        self.scale = None if scale is None else check_scale(scale, 1)  # None: 1/sqrt(D), D known at forward
        self.k_conv = torch.nn.Conv1d(D, D, self.kernel_size, stride=self.stride, bias=bias)
        self.v_conv = torch.nn.Conv1d(Dv, Dv, self.kernel_size, stride=self.stride, bias=bias)
        with torch.no_grad():
            for conv, d in ((self.k_conv, D), (self.v_conv, Dv)):
                conv.weight.zero_()
                conv.weight[torch.arange(d), torch.arange(d)] = 1.0 / self.kernel_size  # mean pooling
                if bias:
                    conv.bias.zero_()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return compressed_attention(q, k, v, k_weight=self.k_conv.weight, v_weight=self.v_conv.weight,
                                    k_bias=self.k_conv.bias, v_bias=self.v_conv.bias, stride=self.stride,
                                    key_padding_mask=key_padding_mask, scale=self.scale)
