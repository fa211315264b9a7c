"""The one entry point: ``attention(q, k, v, pattern)``."""

from __future__ import annotations

import torch

from ._checks import check_dropout, check_key_padding_mask, check_qkv, check_scale
from .dynamic.base import DynamicPattern, check_mechanism_fits
from .engine import Call, select_backend
from .patterns.base import Pattern
from .reference import zeros_from


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention restricted to the pairs ``pattern`` allows.

    Args:
        q: (B, Hq, N, D) queries.
        k: (B, Hkv, S, D) keys; Hq must be a multiple of Hkv, and query head h reads
            key/value head h // (Hq // Hkv) (grouped-query attention).
        v: (B, Hkv, S, Dv) values.
        pattern: a :class:`~sparse_attention.Pattern`; None means full attention. When
            N != S, query i sits at key position i + (S - N) (bottom-right alignment).
        key_padding_mask: (B, S) bool, True marks padding keys that are never attended
            (the torch.nn.MultiheadAttention convention). Default None.
        scale: multiplier of q.k; default None = 1/sqrt(D).
        dropout_p: probability of dropping an attention weight (applied whenever > 0,
            as in SDPA; modules pass 0 in eval mode). Seeded by torch's RNG.
        backend: "auto" (default), "blocksparse" or "dense".

    Returns:
        (B, Hq, N, Dv) in the dtype of q. A query with no allowed key gets output 0 and
        gradient 0. Accumulation is in float32 for half-precision inputs.
    """
    B, Hq, Hkv, N, S, D, Dv = check_qkv(q, k, v)
    check_mechanism_fits(pattern, N, S, Hq)
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, S, q.device)
    scale = check_scale(scale, D)
    dropout_p = check_dropout(dropout_p)
    if B == 0 or Hq == 0 or N == 0 or S == 0 or Dv == 0:
        # no batch entry, head or query: empty output; no keys: every row is empty, so 0 (kept differentiable)
        return zeros_from((B, Hq, N, Dv), q, k, v)
    if isinstance(pattern, DynamicPattern):
        if backend != "auto":
            raise ValueError(f"backend={backend!r}: content-based mechanisms run their own selection and "
                             "attention; use backend='auto'")
        return pattern.attend(q, k, v, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    call = Call(pattern, B, Hq, Hkv, N, S, D, Dv, q.dtype, q.device, needs_grad, dropout_p,
                key_padding_mask is not None)
    chosen = select_backend(backend, call)
    return chosen.run(q, k, v, pattern, scale=scale, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
