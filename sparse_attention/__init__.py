"""sparse_attention: efficient self-attention mechanisms for PyTorch.

    import sparse_attention as sa
    out = sa.attention(q, k, v, sa.SlidingWindow(256))
    out = sa.attention(q, k, v, sa.TopK(32) & sa.Causal())
"""

from __future__ import annotations

from . import approx, integrations, nn, registry
from .allocator import keep_freed_memory
from .approx import linear_attention
from .cost import PatternStats, pattern_stats
from .dynamic import LSH, DynamicPattern, ProbSparse, Routing, TopK, explain, kept_stats
from .functional import attention
from .patterns import (
    BigBird,
    BlockLayout,
    BlockLocal,
    Causal,
    Full,
    Global,
    Intersection,
    Longformer,
    Pattern,
    PerHead,
    RandomBlocks,
    SlidingWindow,
    Strided,
    Union,
)
from .reference import reference_attention
from .registry import mechanisms

__version__ = "0.1.0"

__all__ = [
    "attention", "reference_attention", "mechanisms", "registry", "pattern_stats", "PatternStats",
    "linear_attention", "approx", "nn", "integrations",
    "Pattern", "BlockLayout", "Union", "Intersection", "PerHead",
    "Full", "Causal", "SlidingWindow", "Strided", "BlockLocal", "Global", "RandomBlocks",
    "Longformer", "BigBird",
    "DynamicPattern", "TopK", "ProbSparse", "LSH", "Routing", "explain", "kept_stats",
    "keep_freed_memory",
]
