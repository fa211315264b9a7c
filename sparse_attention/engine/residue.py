"""Strided attention as dense attention within residue classes.

``Strided(s)`` lets query i (at key position p = i + S - N) attend key j when (p - j) mod s == 0:
queries and keys fall into s classes by position mod s, and each class attends only to itself. Put
each class's tokens side by side and the pattern is block-diagonal: s independent full attentions
(causal: a causal attention within each class, since the order of positions is kept), each over
~N/s queries and ~S/s keys. That is 1/s of the dense work with no mask to build, where the pattern
as blocks of consecutive positions touches every block.

stride 2, N = S = 6: positions 0 2 4 form class 0 and 1 3 5 class 1::

    x . x . x .         class 0: x x x     class 1: x x x
    . x . x . x                  x x x              x x x
    x . x . x .                  x x x              x x x
    ...

The classes are gathered by padding the sequences to a multiple of s and reshaping (query i goes to
slot i + r with r = (S - N) mod s, so its slot and its key position agree mod s); padded key slots
are masked (non-causal) or lie after every key a real query may see (causal). Causal attention within a
class is a triangle shifted by (S - N - r) / s slots: SDPA's own is_causal when the shift is 0, there
is no key padding and the scale is positive, else a small (N/s, S/s) mask (with key padding, one per
batch entry and class). The attention is PyTorch's fused SDPA over the classes as (B·s, H, ·, ·).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..patterns.base import Intersection, Pattern
from ..patterns.full import Causal
from ..patterns.strided import Strided
from .blocksparse import all_finite

# causal with key padding needs a (B, stride, N/stride, S/stride) mask: above this many elements (per batch
# entry) the block-sparse layout takes the call instead
CAUSAL_PADDED_MASK_LIMIT = 1 << 24


def as_strided(pattern: Pattern | None) -> Strided | None:
    """``pattern`` as one Strided: itself, or an intersection of Strided(s) (one s) and Causal() parts, which
    is Strided(s, causal=True) (both align queries bottom-right). None otherwise."""
    if isinstance(pattern, Strided):
        return pattern
    if not isinstance(pattern, Intersection):
        return None
    strided = [p for p in pattern.parts if isinstance(p, Strided)]
    if not strided or len({p.stride for p in strided}) != 1 or \
            not all(isinstance(p, (Strided, Causal)) for p in pattern.parts):
        return None
    causal = any(isinstance(p, Causal) or p.causal for p in pattern.parts)
    return Strided(strided[0].stride, causal=causal)


def _slots(n_q: int, n_k: int, s: int) -> tuple[int, int, int]:
    """(r, mq, mk): query i sits at slot i + r, r = (S - N) mod s, so its slot and its key position
    i + S - N agree mod s; mq and mk are the slots per class of the queries and the keys."""
    r = (n_k - n_q) % s
    return r, math.ceil((n_q + r) / s), math.ceil(n_k / s)


def residue_eligible(pattern: Pattern | None, n_q: int, n_k: int, padded: bool) -> bool:
    """Whether ``residue_attention`` runs this call: Strided, except causal with key padding when its mask
    would exceed CAUSAL_PADDED_MASK_LIMIT elements per batch entry."""
    pattern = as_strided(pattern)
    if pattern is None or n_q == 0 or n_k == 0:
        return False
    if not pattern.causal or not padded:
        return True
    _, mq, mk = _slots(n_q, n_k, pattern.stride)
    return pattern.stride * mq * mk <= CAUSAL_PADDED_MASK_LIMIT


def residue_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *, scale: float,
                      key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (B, Hq, N, Dv): ``pattern`` (a Strided, see
    ``as_strided``) by classes.

    Call only where ``residue_eligible``. A query with no allowed key (its class holds no real key, or,
    causal, none at or before it) gets 0 (SDPA's rule for a fully masked row)."""
    pattern = as_strided(pattern)
    B, Hq, N, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    s = pattern.stride
    r, mq, mk = _slots(N, S, s)

    def classes(x: torch.Tensor, front: int, m: int) -> torch.Tensor:
        # (B, H, L, E) -> (B·s, H, m, E): the classes join the batch, so a mask per class broadcasts over heads
        H, L, E = x.shape[1:]
        x = F.pad(x, (0, 0, front, m * s - front - L))
        return x.view(B, H, m, s, E).permute(0, 3, 1, 2, 4).reshape(B * s, H, m, E)

    qc, kc, vc = classes(q, r, mq), classes(k, 0, mk), classes(v, 0, mk)
    # causal: class slot m holds the query at position c + s·m + (S - N - r), so it sees key slots t <= m + shift
    shift = (S - N - r) // s
    # SDPA's own triangle when no mask is needed; not for scale <= 0, where its is_causal gives NaN on CPU
    # (torch 2.13): the explicit triangle below is exact there
    is_causal = pattern.causal and shift == 0 and key_padding_mask is None and scale > 0
    mask = None
    if key_padding_mask is not None or (not pattern.causal and mk * s != S):
        real = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
        real = F.pad(real, (0, mk * s - S), value=False).view(B, mk, s).transpose(1, 2)  # (B, s, mk): real key slots
        mask = real.reshape(B * s, 1, 1, mk)
    if pattern.causal and not is_causal:  # (causal padded slots lie after every key a real query may see)
        tri = torch.ones(mq, mk, dtype=torch.bool, device=q.device).tril(shift)
        mask = tri if mask is None else mask & tri  # (mq, mk) or (B·s, 1, mq, mk)

    def sdpa():
        return F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=Hq != Hkv)

    if all_finite(q, k, v):
        out = sdpa()
    else:
        with sdpa_kernel(SDPBackend.MATH):  # the fused kernels turn NaN query rows into zeros (#141128)
            out = sdpa()
    Dv = out.shape[-1]
    out = out.view(B, s, Hq, mq, Dv).permute(0, 2, 3, 1, 4).reshape(B, Hq, mq * s, Dv)  # slots in position order
    return out[:, :, r:r + N]
