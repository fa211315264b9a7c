"""Synthesizer: attention weights that are synthesized, not computed from query-key dot products.

    out = softmax(R) V                                   (random: R a learned or fixed N × S matrix)
    out = softmax(W2 relu(W1 x_i + b1) + b2) V           (dense: logits of row i from token i alone)
    out = softmax((1 - α) R + α QKᵀ·scale) V             (mixed with dot-product attention)

Tay et al., "Synthesizer: Rethinking Self-Attention in Transformer Models", ICML 2021,
arXiv:2005.00743. Factorized variants (section 3.3): dense logits A_i (a) and B_i (b) with a·b =
max_len tiled and multiplied, R_ij = A_{i, j // b} · B_{i, j mod b}; random R = R1 R2ᵀ of rank r.
The logits are built by ``sparse_attention.nn.SynthesizerAttention`` (which owns the parameters);
this file holds the attention step and the factorized tiling.
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_key_padding_mask, check_qkv, check_scale
from ._common import compute_dtype, masked_softmax, zero_padded

__all__ = ["synthesizer_attention", "tile_factorized", "reference_synthesizer_attention"]


def tile_factorized(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R[..., i, j] = a[..., i, j // b.shape[-1]] * b[..., i, j % b.shape[-1]], shape (..., L, a·b)."""
    na, nb = a.shape[-1], b.shape[-1]
    return (a[..., :, None] * b[..., None, :]).reshape(*a.shape[:-1], na * nb)  # (..., L, na*nb)


def synthesizer_attention(
    logits: torch.Tensor,
    v: torch.Tensor,
    *,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    dot_weight: torch.Tensor | float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(logits [mixed with q·k]) v.

    Args:
        logits: synthesized scores, (N, S), (H, N, S) or (B, H, N, S) with H in {1, Hq}.
        v: (B, Hkv, S, Dv), Hq a multiple of Hkv (query head h reads value head h // (Hq // Hkv)).
        q, k: (B, Hq, N, D), (B, Hkv, S, D); needed only with ``dot_weight``.
        dot_weight: α in [0, 1] (float or 0-dim tensor, differentiable): scores are
            (1 - α)·logits + α·q·kᵀ·scale. None = logits only.
        causal: query i attends keys j <= i (top-left; needs N == S):

                k: 0 1 2
            q 0:   1 0 0
            q 1:   1 1 0
            q 2:   1 1 1

        key_padding_mask: (B, S) bool, True = padding (never attended).
        scale: default 1/sqrt(D).

    Returns:
        (B, Hq, N, Dv) in v's dtype; rows with no allowed key give 0.
    """
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or not v.dtype.is_floating_point:
        raise ValueError(f"v must be a floating tensor of shape (B, Hkv, S, Dv), got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating tensor, got "
                        f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dim() not in (2, 3, 4):
        raise ValueError(f"logits must have shape (N, S), (H, N, S) or (B, H, N, S), got {tuple(logits.shape)}")
    B, Hkv, S, Dv = v.shape
    N = logits.shape[-2]
    Hl = logits.shape[-3] if logits.dim() >= 3 else 1
    Hq = q.shape[1] if q is not None else (Hl if Hl > 1 else Hkv)
    if logits.shape[-1] != S:
        raise ValueError(f"logits must have S={S} columns (v.shape[2]), got logits.shape={tuple(logits.shape)}")
    if logits.dim() >= 3 and logits.shape[-3] not in (1, Hq):
        raise ValueError(f"logits heads must be 1 or Hq={Hq}, got logits.shape={tuple(logits.shape)}")
    if logits.dim() == 4 and logits.shape[0] not in (1, B):
        raise ValueError(f"logits batch must be 1 or B={B}, got logits.shape={tuple(logits.shape)}")
    if Hkv == 0 and Hq != 0:
        raise ValueError(f"v has no heads (v.shape[1]=0) while the query side has {Hq}: each query head reads a "
                         "value head")
    if Hkv and Hq % Hkv:  # (no heads on either side: an empty output)
        raise ValueError(f"the number of query heads must be a multiple of the value heads, got Hq={Hq}, Hkv={Hkv}")
    check_bool("causal", causal)
    if causal and N != S:
        raise ValueError(f"causal synthesizer attention needs N == S, got N={N}, S={S}")
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, S, v.device)
    dtype = compute_dtype(v.dtype)
    scores = logits.to(dtype)
    if dot_weight is not None:
        if q is None or k is None:
            raise ValueError("dot_weight needs q and k (the dot-product scores it mixes in)")
        _, Hq2, _, Nq, Sk, D, _ = check_qkv(q, k, v)
        if Nq != N:
            raise ValueError(f"q has N={Nq} rows but logits has {N}")
        alpha = torch.as_tensor(dot_weight, dtype=dtype, device=v.device)
        if alpha.dim() != 0 or not (0.0 <= float(alpha.detach()) <= 1.0):
            raise ValueError(f"dot_weight must be a scalar in [0, 1], got {dot_weight!r}")
        scale = check_scale(scale, D)
        # padded keys zeroed (where): inf/NaN there would reach q's gradient through the masked scores
        group = Hq2 // Hkv if Hkv else 1
        kk = zero_padded(k.to(dtype), key_padding_mask).repeat_interleave(group, dim=1)  # (B, Hq, S, D)
        dots = q.to(dtype) @ kk.transpose(-1, -2) * scale  # (B, Hq, N, S)
        scores = (1 - alpha) * scores + alpha * dots
    elif q is not None and q.shape[1] != Hq:
        raise ValueError(f"q has {q.shape[1]} heads but logits has {Hq}")
    # a row of -inf logits is an empty row (output 0, RELIABILITY.md), which torch.softmax would make NaN
    if causal or key_padding_mask is not None or (S > 0 and bool(torch.isneginf(scores.detach().amax(-1)).any())):
        keep = torch.ones(N, S, dtype=torch.bool, device=v.device)
        if causal:
            keep = torch.tril(keep)
        if key_padding_mask is not None:
            keep = keep & ~key_padding_mask[:, None, None, :]  # (B, 1, N, S)
        p = masked_softmax(scores, keep)  # (…, Hq|1, N, S)
    else:  # every row has a key: one fused pass over the N x S scores (NaN still propagates)
        p = torch.softmax(scores, -1)
    vv = zero_padded(v.to(dtype), key_padding_mask)
    if Hq > Hkv:
        vv = vv.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, Dv)
    return (p @ vv).to(v.dtype)


def reference_synthesizer_attention(logits, v, *, causal=False, key_padding_mask=None):
    """softmax(R) V written out with the dense mask, for tests (no mixing)."""
    B, Hkv, S, Dv = v.shape
    N = logits.shape[-2]
    Hq = logits.shape[-3] if logits.dim() >= 3 else Hkv
    v = v.repeat_interleave(max(Hq // Hkv, 1), dim=1)
    allowed = torch.ones(N, S, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return p @ v
