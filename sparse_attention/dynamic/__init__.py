"""Content-based sparsity: the data decide which pairs are kept."""

from .base import DynamicPattern
from .explain import KeptStats, explain, kept_stats
from .lsh import LSH
from .probsparse import ProbSparse
from .routing import Routing, update_centroids
from .sinkhorn import sinkhorn, sinkhorn_attention, sinkhorn_reference
from .topk import TopK

__all__ = [
    "DynamicPattern", "TopK", "ProbSparse", "LSH", "Routing", "update_centroids", "explain", "kept_stats", "KeptStats",
    "sinkhorn", "sinkhorn_attention", "sinkhorn_reference",
]
