"""Which pairs a mechanism keeps for given inputs, and summary statistics of that choice."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_key_padding_mask, check_qkv, check_scale
from ..patterns.base import Pattern
from .base import DynamicPattern, check_mechanism_fits


def explain(q: torch.Tensor, k: torch.Tensor, mechanism: Pattern | DynamicPattern | None, *,
            key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """(B, Hq, N, S) bool: the pairs ``mechanism`` keeps for these q (B, Hq, N, D) and k (B, Hkv, S, D).

    Static patterns give their mask (key padding removed); content-based mechanisms the
    pairs their selection kept (ProbSparse: the rows of the active queries; lazy rows
    are all False). Materialises B*H*N*S booleans: for inspection and tests.
    """
    B, Hq, _, N, S, D, _ = check_qkv(q, k, k)
    check_mechanism_fits(mechanism, N, S, Hq, name="mechanism")
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, S, q.device)
    scale = check_scale(scale, D)
    if isinstance(mechanism, DynamicPattern):
        if 0 in (B, Hq, N, S):  # as in sa.attention: no batch entry, head, query or key, so no pair
            return torch.zeros(B, Hq, N, S, dtype=torch.bool, device=q.device)
        return mechanism.kept(q, k, key_padding_mask=key_padding_mask, scale=scale)
    m = torch.ones(N, S, dtype=torch.bool, device=q.device) if mechanism is None else mechanism.mask(N, S, q.device)
    m = m.expand(B, Hq, N, S).clone()
    if key_padding_mask is not None:
        m &= ~key_padding_mask[:, None, None, :]
    return m


@dataclass(frozen=True)
class KeptStats:
    density: float  # kept pairs / (N * S)
    mean_distance: float  # mean |i - j| over kept pairs, i the query's key-space position
    empty_rows: float  # fraction of queries that keep no key

    def __str__(self) -> str:
        return (f"density {self.density:.4f}, mean |i - j| {self.mean_distance:.1f}, "
                f"queries with no key {self.empty_rows:.3f}")


def kept_stats(kept: torch.Tensor) -> KeptStats:
    """Summary of an ``explain`` result (B, H, N, S) bool."""
    if not isinstance(kept, torch.Tensor) or kept.dtype != torch.bool or kept.dim() < 2:
        got = f"{kept.dtype} tensor of shape {tuple(kept.shape)}" if isinstance(kept, torch.Tensor) else \
            type(kept).__name__
        raise TypeError(f"kept must be a bool tensor (..., N, S) from sa.explain, got {got}")
    N, S = kept.shape[-2:]
    pos = torch.arange(N, device=kept.device).view(-1, 1) + (S - N)
    dist = (pos - torch.arange(S, device=kept.device).view(1, -1)).abs().to(torch.float64)
    total = int(kept.sum())
    mean_d = float((dist * kept).sum() / total) if total else 0.0
    return KeptStats(total / max(kept.numel(), 1), mean_d, float((~kept.any(-1)).double().mean()) if N else 0.0)
