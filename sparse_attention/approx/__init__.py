"""Approximate (not sparse) attention: the functional cores of linear attention, Linformer,
compressed attention, Nyström and Synthesizer. Learned parameters live in ``sparse_attention.nn``."""

from __future__ import annotations

from .linear import (
    EluFeatureMap,
    FavorPlus,
    FeatureMap,
    ReluFeatureMap,
    linear_attention,
    reference_linear_attention,
    resolve_feature_map,
)

__all__ = [
    "FeatureMap", "EluFeatureMap", "ReluFeatureMap", "FavorPlus", "resolve_feature_map",
    "linear_attention", "reference_linear_attention",
]
