"""Performer attention (Choromanski et al., arXiv:2009.14794): linear attention with FAVOR+ features."""

from __future__ import annotations

import torch

from .._checks import check_bool, check_int
from ..approx.linear import FavorPlus, LinearAttentionState, _check_eps, linear_attention


class PerformerAttention(torch.nn.Module):
    """FAVOR+ linear attention; owns the random projection (a buffer, not a parameter).

    Args:
        head_dim: D.
        num_features: F random features; default round(D · ln D).
        causal: causal linear attention (chunked prefix form; needs N == S).
        seed: seed of the random features (deterministic draws).
        redraw_interval: in training mode, draw new features every this many forward calls
            (performer-pytorch's feature_redraw_interval); None (default) = never. Eval never redraws.
        chunk_size, eps: passed to :func:`sparse_attention.linear_attention`.

    forward(q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), *, key_padding_mask=None, state=None)
    -> (B, Hq, N, Dv). ``state``: a :class:`~sparse_attention.approx.LinearAttentionState` to decode a causal
    sequence chunk by chunk; while it holds keys no redraw happens (its sums were built with the current
    features).
    """

    def __init__(self, head_dim: int, num_features: int | None = None, *, causal: bool = False, seed: int = 0,
                 redraw_interval: int | None = None, chunk_size: int = 64, eps: float = 1e-6):
        super().__init__()
        self.causal = check_bool("causal", causal)
        self.feature_map = FavorPlus(head_dim, num_features, seed=seed)
        self.redraw_interval = None if redraw_interval is None else check_int("redraw_interval", redraw_interval,
                                                                              minimum=1)
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.eps = _check_eps(eps)
        self.calls = 0

    def redraw(self) -> None:
        """Draw fresh random features (deterministic sequence for the seed)."""
        self.feature_map.redraw()

    def get_extra_state(self) -> dict:
        """The training-call count travels with the state_dict, so a loaded module redraws on the saved
        module's schedule (the draws themselves are the feature map's state)."""
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None,
                state: LinearAttentionState | None = None) -> torch.Tensor:
        mid_sequence = state is not None and state.length > 0
        if self.training and self.redraw_interval is not None and not mid_sequence:
            if self.calls and self.calls % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        return linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal,
                                chunk_size=self.chunk_size, key_padding_mask=key_padding_mask, eps=self.eps,
                                state=state)
