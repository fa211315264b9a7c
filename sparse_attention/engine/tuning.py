"""Block size choice for the block-sparse engine."""

from __future__ import annotations

from ..patterns.base import Pattern


def choose_block(pattern: Pattern, n_q: int, n_k: int) -> int:
    """Block size for this pattern and these lengths."""
    n = max(n_q, n_k)
    if n <= 64:
        return max(16, n)
    return 64 if n <= 2048 else 128
