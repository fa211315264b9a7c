"""Dense backend: PyTorch's SDPA.

Full attention and causal attention with N == S run on SDPA's own fused kernels (no
mask, O(N) memory). Any other pattern gets its N x S mask materialised: the fastest
choice for short sequences, memory O(B * H * N * S). Non-finite inputs go to SDPA's
math kernel, which propagates NaN (the fused CPU kernel zeroes NaN query rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..patterns.base import Pattern
from ..patterns.full import Causal, Full
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


def sdpa_native(pattern: Pattern | None, n_q: int, n_k: int, padded: bool) -> bool:
    """Patterns SDPA runs itself without a materialised mask: full, and causal when N == S (unpadded)."""
    return pattern is None or isinstance(pattern, Full) or (isinstance(pattern, Causal) and n_q == n_k and not padded)


def dense_attention(q, k, v, pattern, *, scale, key_padding_mask=None, dropout_p=0.0):
    N, S = q.shape[2], k.shape[2]
    # (SDPA's is_causal gives NaN for scale <= 0 on CPU in torch 2.13: use the mask there)
    is_causal = isinstance(pattern, Causal) and N == S and key_padding_mask is None and scale > 0
    if is_causal or isinstance(pattern, Full):
        pattern = None  # SDPA's is_causal is top-left aligned, which equals ours when N == S
    mask = dense_mask(pattern, N, S, key_padding_mask, q.device)  # broadcastable to (B, H, N, S)
    gqa = q.shape[1] != k.shape[1]

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=gqa)

    if all_finite(q, k, v):
        return sdpa()
    with sdpa_kernel(SDPBackend.MATH):  # fused kernels turn NaN query rows into zeros (#141128)
        return sdpa()
