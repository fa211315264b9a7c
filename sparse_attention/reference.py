"""The readable reference: dense masked softmax attention, written for clarity.

Every engine and mechanism is tested against this function (with ``mask`` from
``pattern.mask``), usually in float64. Tests, benchmarks and plots import it from here.
"""

from __future__ import annotations

import torch

from ._checks import check_scale


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the last dim restricted to ``keep`` (broadcastable bool, None = all).

    A row with nothing kept gives exactly 0 (not NaN); a NaN score still propagates. No columns: the
    (empty) scores themselves.
    """
    if scores.shape[-1] == 0:
        return scores
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()  # any shift gives the same softmax
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)  # exactly 0 where masked
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale, restricted to allowed pairs) v, with empty rows giving 0.

    Args:
        q: (B, Hq, N, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv); Hq a multiple of Hkv,
            query head h reads key/value head h // (Hq // Hkv).
        mask: bool, True = may attend; (N, S), (H, N, S) or anything broadcastable to
            (B, Hq, N, S). None = every pair.
        key_padding_mask: (B, S) bool, True = padding (never attended).
        scale: None = 1/sqrt(D).
        dropout_mask: optional bool keep-mask broadcastable to (B, Hq, N, S); kept
            probabilities are divided by (1 - dropout_p).
        upcast: compute in float32 when inputs are half precision (False = compute in the
            input dtype, which is how the tolerance baseline "ref_lp" is produced).
    Returns:
        (B, Hq, N, Dv) in q's dtype.
    """
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1] if k.shape[1] else 1  # (no heads on either side: an empty output)
    k = k.repeat_interleave(G, dim=1)  # (B, Hq, S, D)
    v = v.repeat_interleave(G, dim=1)
    scale = check_scale(scale, D)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, N, S)
    allowed = torch.ones(scores.shape, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & mask
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    p = masked_softmax(scores, allowed)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p) if dropout_p < 1.0 else torch.zeros_like(p)
    return torch.matmul(p, v).to(dtype)


class _ZerosFrom(torch.autograd.Function):
    """Zeros of a given shape that depend on some inputs with gradient exactly 0 (no NaN from them)."""

    @staticmethod
    def forward(ctx, shape, *inputs):
        ctx.inputs = [(t.shape, t.dtype, t.device) for t in inputs]
        return inputs[0].new_zeros(shape)

    @staticmethod
    def backward(ctx, grad):
        return (None, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.inputs))


def zeros_from(shape: tuple[int, ...], *inputs: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape`` (dtype and device of the first input) in the autograd graph of ``inputs``, each of
    which gets gradient 0: the output of a call with no query or no key. (``x.sum() * 0`` would spread a NaN
    or inf of any input over every zero, and its gradient.)"""
    return _ZerosFrom.apply(tuple(shape), *inputs)
