"""Additive attention pooling: a learned weighted average over time.

Score each time step with a small MLP, softmax over time, take the weighted sum
(Bahdanau et al., 2015, arXiv:1409.0473; as a pooling layer: Yang et al., 2016,
"Hierarchical Attention Networks"; per feature: Shen et al., 2018, DiSAN,
arXiv:1709.04696, "multi-dimensional attention")::

    u_t = tanh(W x_t + b)            (hidden)
    e_t = v^T u_t                    pool="time":    one score per step
    e_t = V u_t + c                  pool="feature": one score per step and feature
    a   = softmax_t(e)               padding steps excluded
    y   = sum_t a_t * x_t
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_int
from ..reference import masked_softmax

_POOLS = ("time", "feature")


class AttentionPooling(torch.nn.Module):
    """Pool a sequence (B, T, C) into (B, C) with learned additive attention.

    Args:
        dim: C, the feature size of the input.
        hidden: width of the scoring MLP; default None = C.
        pool: "time" (default): one weight per time step, shared by all features;
            "feature": a separate softmax over time for every feature (weights (B, T, C)).
        bias: biases in the scoring MLP. Default True.

    forward(x, key_padding_mask=None) -> (pooled, weights):
        x (B, T, C); key_padding_mask (B, T) bool, True = padding (never pooled, as in
        torch.nn.MultiheadAttention). pooled (B, C); weights (B, T) for pool="time",
        (B, T, C) for pool="feature", summing to 1 over T. A fully padded sequence gives
        pooled 0 and weights 0 (no NaN).
    """

    def __init__(self, dim: int, hidden: int | None = None, *, pool: str = "time", bias: bool = True):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.hidden = self.dim if hidden is None else check_int("hidden", hidden, minimum=1)
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        self.pool = pool
        bias = check_bool("bias", bias)
        self.proj = torch.nn.Linear(self.dim, self.hidden, bias=bias)
        self.score = torch.nn.Linear(self.hidden, 1 if pool == "time" else self.dim, bias=bias and pool == "feature")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, pool={self.pool!r}"

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, T, C={self.dim}), got {got}")
        B, T, _ = x.shape
        keep = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got "
                                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
            if tuple(key_padding_mask.shape) != (B, T):
                raise ValueError(f"key_padding_mask must have shape (B, T) = {(B, T)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            # padded steps zeroed first: inf/NaN there reach neither the scores nor the pooled vector
            x = torch.where(key_padding_mask.unsqueeze(-1), torch.zeros((), dtype=x.dtype, device=x.device), x)
            keep = ~key_padding_mask[:, None, :]
        scores = self.score(torch.tanh(self.proj(x)))  # (B, T, 1) or (B, T, C)
        # softmax over time; padded steps weigh 0, a column with no valid step (or T = 0) gives 0, not NaN
        weights = masked_softmax(scores.transpose(1, 2), keep).transpose(1, 2)  # (B, T, 1 | C)
        pooled = (weights * x).sum(1)  # (B, C)
        return pooled, (weights.squeeze(-1) if self.pool == "time" else weights)
