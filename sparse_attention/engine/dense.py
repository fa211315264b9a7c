"""Dense backend: materialise the N x S mask and call SDPA's math kernel.

The reference the fast engines are checked against at run time, and the fastest
choice for short sequences. Memory O(B * H * N * S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..patterns.base import Pattern
from .blocksparse import all_finite


def dense_mask(pattern: Pattern | None, n_q: int, n_k: int, key_padding_mask, device) -> torch.Tensor | None:
    """Bool mask broadcastable to (B, H, N, S), True = attend; None when every pair is allowed."""
    mask = None if pattern is None else pattern.mask(n_q, n_k, device=device)
    if mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(0)  # (1, H, N, S)
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = keep if mask is None else mask & keep
    return mask


def dense_attention(q, k, v, pattern, *, scale, key_padding_mask=None, dropout_p=0.0):
    mask = dense_mask(pattern, q.shape[2], k.shape[2], key_padding_mask, q.device)
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    gqa = q.shape[1] != k.shape[1]

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)

    if all_finite(q, k, v):
        return sdpa()
    with sdpa_kernel(SDPBackend.MATH):  # fused kernels turn NaN query rows into zeros (#141128)
        return sdpa()
