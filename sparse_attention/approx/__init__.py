"""Approximate (not sparse) attention: the functional cores of linear attention, Linformer,
compressed attention, Nyström and Synthesizer. Learned parameters live in ``sparse_attention.nn``."""

from __future__ import annotations

from .linear import (
    EluFeatureMap,
    FavorPlus,
    FeatureMap,
    LinearAttentionState,
    ReluFeatureMap,
    linear_attention,
    reference_linear_attention,
    resolve_feature_map,
)

__all__ = [
    "FeatureMap", "EluFeatureMap", "ReluFeatureMap", "FavorPlus", "resolve_feature_map",
    "LinearAttentionState", "linear_attention", "reference_linear_attention",
]
from .compressed import compress, compressed_attention, compressed_length, reference_compressed_attention
from .linformer import linformer_attention, reference_linformer_attention
from .nystrom import iterative_pinv, nystrom_attention, reference_nystrom_attention, segment_means
from .synthesizer import reference_synthesizer_attention, synthesizer_attention, tile_factorized

__all__ += [
    "compress", "compressed_attention", "compressed_length", "reference_compressed_attention",
    "linformer_attention", "reference_linformer_attention",
    "iterative_pinv", "nystrom_attention", "reference_nystrom_attention", "segment_means",
    "synthesizer_attention", "reference_synthesizer_attention", "tile_factorized",
]
