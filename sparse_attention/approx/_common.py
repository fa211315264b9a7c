"""Small helpers shared by the approximate mechanisms (masked softmax with the empty-row rule)."""

from __future__ import annotations

import torch

from ..engine.blocksparse import all_finite
from ..reference import masked_softmax

__all__ = ["masked_softmax", "zero_padded", "compute_dtype", "softmax_attention"]


def zero_padded(x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, S, ·), or the inputs (B, S, ·), with the rows of padded keys set to 0 by ``where`` (so
    inf/NaN there never leak)."""
    if key_padding_mask is None:
        return x
    pad = key_padding_mask[:, :, None] if x.dim() == 3 else key_padding_mask[:, None, :, None]
    return torch.where(pad, torch.zeros((), dtype=x.dtype, device=x.device), x)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (fp32 accumulation), else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """Plain masked softmax attention, q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), GQA by
    repeat_interleave; ``keep`` bool broadcastable to (B, Hq, N, S); empty rows give 0."""
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, Hq, S, ·)
    return masked_softmax(q @ k.transpose(-1, -2) * scale, keep) @ v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
         keep: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's SDPA (fused CPU kernel for fp32/bf16/fp16) with GQA and a bool ``keep`` mask.

    A row with nothing kept gives 0 (torch >= 2.5 on both the math and the fused CPU kernel,
    RELIABILITY.md); callers zero padded k/v first so non-finite values there never leak. Non-finite
    inputs take ``softmax_attention``: the fused kernel turns a row with a NaN score into zeros
    (pytorch#141128), where NaN must propagate.
    """
    if not all_finite(q, k, v):
        return softmax_attention(q, k, v, scale=scale, keep=keep)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=keep, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
