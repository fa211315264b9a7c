"""Linformer: attention to keys and values projected along the sequence to a fixed length K.

    out = softmax(Q (E K)ᵀ · scale) (F V),   E, F: (K × S)

Wang et al., "Linformer: Self-Attention with Linear Complexity", arXiv:2006.04768. The projections
are learned (``sparse_attention.nn.LinformerAttention`` owns them); this is the math.

Why no causal mode and no longer sequences: each projected key is a mixture of *all* positions, so
query i would read keys after i, and E has one column per position of the training length.
Shorter sequences use the first S columns of E and F (what a zero-padded input would give).
"""

from __future__ import annotations

import torch

from .._checks import check_key_padding_mask, check_qkv, check_scale
from ._common import compute_dtype, sdpa, softmax_attention, zero_padded

__all__ = ["linformer_attention", "reference_linformer_attention", "check_projection"]


def check_projection(name: str, p: object, Hkv: int, S: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (K, seq_len) or (Hkv, K, seq_len), got "
                        f"{type(p).__name__}")
    if p.dim() not in (2, 3) or (p.dim() == 3 and p.shape[0] != Hkv):
        raise ValueError(f"{name} must have shape (K, seq_len) or (Hkv={Hkv}, K, seq_len), got {tuple(p.shape)}")
    if not p.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {p.dtype}")
    if p.device != device:
        raise ValueError(f"{name} is on {p.device} but q/k/v are on {device}")
    if p.shape[-1] < S:
        raise ValueError(
            f"sequence length S={S} exceeds the {name} projection's length {p.shape[-1]}: Linformer learns one "
            "column per position, so it cannot take sequences longer than the seq_len it was built for"
        )
    if p.shape[-2] == 0:
        raise ValueError(f"{name} projects to K=0 positions; K must be >= 1")


def _project(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(K, L) or (Hkv, K, L) sliced to S columns, applied to x (B, Hkv, S, ·) -> (B, Hkv, K, ·)."""
    S = x.shape[2]
    return p[..., :S].to(x.dtype) @ x


def linformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    e_proj: torch.Tensor,
    f_proj: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention of q to E·k and F·v.

    Args:
        q: (B, Hq, N, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv); GQA as in ``sa.attention``.
        e_proj: E, (K, L) shared by all heads or (Hkv, K, L) per key/value head, L >= S; columns
            S.. are unused (the sequence is shorter than the one E was built for).
        f_proj: F, same shapes; None = E (keys and values share one projection).
        key_padding_mask: (B, S) bool, True = padding: those keys and values are left out of the
            mixtures (set to 0 before projecting).
        scale: default 1/sqrt(D).
        causal: must be False (ValueError explains why).

    Returns:
        (B, Hq, N, Dv) in q's dtype. O(N·K) time and memory per head.
    """
    B, Hq, Hkv, N, S, D, Dv = check_qkv(q, k, v)
    if causal:
        raise ValueError("Linformer cannot be causal: every projected key mixes all S positions, so query i "
                         "would read keys after i; use linear_attention(causal=True) instead")
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, S, q.device)
    scale = check_scale(scale, D)
    f_proj = e_proj if f_proj is None else f_proj
    check_projection("e_proj", e_proj, Hkv, S, q.dtype, q.device)
    check_projection("f_proj", f_proj, Hkv, S, q.dtype, q.device)
    if f_proj.shape[-2] != e_proj.shape[-2]:
        raise ValueError(f"e_proj and f_proj must project to the same K (keys and values pair up), got "
                         f"K={e_proj.shape[-2]} and K={f_proj.shape[-2]}")
    dtype = compute_dtype(q.dtype)
    kc = _project(e_proj, zero_padded(k.to(dtype), key_padding_mask))  # (B, Hkv, K, D)
    vc = _project(f_proj, zero_padded(v.to(dtype), key_padding_mask))  # (B, Hkv, K, Dv)
    return sdpa(q.to(dtype), kc, vc, scale=scale).to(q.dtype)


def reference_linformer_attention(q, k, v, *, e_proj, f_proj=None, key_padding_mask=None, scale=None):
    """Readable form: materialise E·K and F·V, then masked-softmax attention (float64-friendly)."""
    f_proj = e_proj if f_proj is None else f_proj
    S = k.shape[2]
    if key_padding_mask is not None:
        keep = (~key_padding_mask)[:, None, :, None].to(k.dtype)  # (B, 1, S, 1)
        k, v = k * keep, v * keep
    kc = e_proj[..., :S].to(k.dtype) @ k
    vc = f_proj[..., :S].to(v.dtype) @ v
    scale = check_scale(scale, q.shape[-1])
    return softmax_attention(q, kc, vc, scale=scale)
