"""Linformer attention module (Wang et al., arXiv:2006.04768): learned E, F projections of K and V."""

from __future__ import annotations

import math

import torch

from .._checks import check_int
from ..approx.linformer import linformer_attention


class LinformerAttention(torch.nn.Module):
    """Attention to K and V projected along the sequence from ``seq_len`` to ``k`` positions.

    Args:
        seq_len: L, the longest sequence accepted; shorter ones use the first S columns of E, F.
        k: K, projected length (k = seq_len with identity E, F is exact attention).
        num_heads: None (default) = one E (and F) shared by all heads; an int = one per key/value head.
        share_kv: True = F is E (one projection for keys and values). Sharing across layers: pass
            the same module to each layer.
        causal: must be False; ValueError explaining why otherwise.
        scale: default 1/sqrt(D).

    Parameters E, F: (K, L) or (num_heads, K, L), initialised N(0, 1/K) (as the linformer package).
    forward(q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), *, key_padding_mask=None)
    -> (B, Hq, N, Dv); S > seq_len raises ValueError.
    """

    def __init__(self, seq_len: int, k: int, *, num_heads: int | None = None, share_kv: bool = False,
                 causal: bool = False, scale: float | None = None):
        super().__init__()
        self.seq_len = check_int("seq_len", seq_len, minimum=1)
        self.k = check_int("k", k, minimum=1)
        if causal:
            raise ValueError("LinformerAttention cannot be causal: every projected key mixes all positions, so "
                             "query i would read keys after i; use PerformerAttention(causal=True) or "
                             "sparse_attention.linear_attention(causal=True)")
        heads = () if num_heads is None else (check_int("num_heads", num_heads, minimum=1),)
        self.num_heads = num_heads
        self.scale = scale
        self.e_proj = torch.nn.Parameter(torch.randn(*heads, self.k, self.seq_len) / math.sqrt(self.k))
        self.f_proj = None if share_kv else torch.nn.Parameter(
            torch.randn(*heads, self.k, self.seq_len) / math.sqrt(self.k))

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, k={self.k}, num_heads={self.num_heads}, share_kv={self.f_proj is None}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return linformer_attention(q, k, v, e_proj=self.e_proj, f_proj=self.f_proj,
                                   key_padding_mask=key_padding_mask, scale=self.scale)
