"""Nyström attention module (Xiong et al., arXiv:2102.03902)."""

from __future__ import annotations

import torch

from .._checks import check_int, check_scale
from ..approx.nystrom import nystrom_attention


class NystromAttention(torch.nn.Module):
    """Nyström approximation of softmax attention with ``num_landmarks`` segment-mean landmarks.

    No parameters: the landmarks are data-dependent. Args: num_landmarks (m), pinv_iterations
    (default 6), scale (default 1/sqrt(D)). Sequences shorter than m raise ValueError (see
    :func:`sparse_attention.approx.nystrom_attention`).
    forward(q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), *, key_padding_mask=None)
    -> (B, Hq, N, Dv).
    """

    def __init__(self, num_landmarks: int, *, pinv_iterations: int = 6, scale: float | None = None):
        super().__init__()
        self.num_landmarks = check_int("num_landmarks", num_landmarks, minimum=1)
        self.pinv_iterations = check_int("pinv_iterations", pinv_iterations, minimum=0)
        self.scale = None if scale is None else check_scale(scale, 1)  # None: 1/sqrt(D), D known at forward

    def extra_repr(self) -> str:
        return f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return nystrom_attention(q, k, v, num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations,
                                 key_padding_mask=key_padding_mask, scale=self.scale)
