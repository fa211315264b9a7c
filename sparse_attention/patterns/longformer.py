"""Longformer attention (Beltagy et al., 2020, arXiv:2004.05150).

A (dilated) sliding window plus global positions:
(|i - j| <= window*dilation and (i - j) mod dilation == 0) or i in G or j in G, and, when
causal, j <= i for every pair, the global ones included (a global position sees every earlier key
and is seen by every later query; outputs never depend on later tokens). A composition of
SlidingWindow, Strided, Global and Causal.

window=1, dilation=1, G={0}, N=S=5::

    x x x x x
    x x x . .
    x x x x .
    x . x x x
    x . . x x
"""

from __future__ import annotations

from .._checks import check_bool, check_indices, check_int
from .base import Composite, Pattern
from .full import Causal
from .global_tokens import Global
from .sliding_window import SlidingWindow
from .strided import Strided


class Longformer(Composite):
    """Sliding window of ``window`` attended positions each side (spaced ``dilation`` apart) + globals."""

    def __init__(self, window: int, global_indices=(), dilation: int = 1, causal: bool = False):
        self.window = check_int("window", window, minimum=0)
        self.global_indices = check_indices("global_indices", global_indices)
        self.dilation = check_int("dilation", dilation, minimum=1)
        check_bool("causal", causal)
        self.causal = causal
        local: Pattern = SlidingWindow(self.window * self.dilation, causal=causal)
        if self.dilation > 1:
            local = local & Strided(self.dilation)
        if self.global_indices:
            glob: Pattern = Global(self.global_indices)
            local = local | (glob & Causal() if causal else glob)
        self._pattern = local

    def compose(self, n_q, n_k):
        return self._pattern

    def _key(self):
        return ("Longformer", self.window, self.global_indices, self.dilation, self.causal)

    def __repr__(self):
        return (f"Longformer(window={self.window}, global_indices={self.global_indices}, "
                f"dilation={self.dilation}, causal={self.causal})")
