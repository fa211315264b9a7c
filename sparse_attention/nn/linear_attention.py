"""Linear attention module with a fixed feature map (Katharopoulos et al., arXiv:2006.16236).

A parameter-free head-split module around :func:`sparse_attention.linear_attention`, so that
``sa.nn.MultiheadAttention(E, H, attention="linear")`` runs elu+1 (or ReLU) linear attention.
For Performer's random features see :class:`~sparse_attention.nn.PerformerAttention`.
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_int
from ..approx.linear import FEATURE_MAPS, LinearAttentionState, _check_eps, linear_attention


class LinearAttention(torch.nn.Module):
    """out_i = φ(q_i) Σ_j φ(k_j) v_jᵀ / φ(q_i) · Σ_j φ(k_j), O(N) time; no parameters.

    Args:
        feature_map: "elu" (elu(x) + 1, default) or "relu".
        causal: query i sums over keys j <= i only (needs N == S). Default False.
        chunk_size, eps: passed to :func:`sparse_attention.linear_attention` (defaults 64, 1e-6).

    forward(q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), *, key_padding_mask=None, state=None)
    -> (B, Hq, N, Dv); ``key_padding_mask`` (B, S) bool, True = padding; ``state`` a
    :class:`~sparse_attention.approx.LinearAttentionState` to decode a causal sequence chunk by chunk
    (see :func:`sparse_attention.linear_attention`).
    """

    def __init__(self, feature_map: str = "elu", *, causal: bool = False, chunk_size: int = 64, eps: float = 1e-6):
        super().__init__()
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r} (for "
                             "Performer's random features use sparse_attention.nn.PerformerAttention)")
        self.feature_map = feature_map
        self.causal = check_bool("causal", causal)
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.eps = _check_eps(eps)

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map!r}, causal={self.causal}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None,
                state: LinearAttentionState | None = None) -> torch.Tensor:
        return linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal,
                                chunk_size=self.chunk_size, key_padding_mask=key_padding_mask, eps=self.eps,
                                state=state)
