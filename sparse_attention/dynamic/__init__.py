"""Content-based sparsity: the data decide which pairs are kept."""

from .base import DynamicPattern
from .explain import KeptStats, explain, kept_stats
from .lsh import LSH
from .probsparse import ProbSparse
from .topk import TopK

__all__ = ["DynamicPattern", "TopK", "ProbSparse", "LSH", "explain", "kept_stats", "KeptStats"]
