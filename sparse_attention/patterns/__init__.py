"""Static (data-independent) attention patterns. One file per pattern."""

from .base import ANTICAUSAL, CAUSAL, EMPTY, FULL, MASKED, BlockLayout, Composite, Intersection, Pattern, PerHead, Union
from .bigbird import BigBird, BlockWindow
from .block_local import BlockLocal
from .full import Causal, Full
from .global_tokens import Global
from .longformer import Longformer
from .random_blocks import RandomBlocks
from .sliding_window import SlidingWindow
from .strided import Strided

__all__ = [
    "Pattern", "Composite", "Union", "Intersection", "PerHead", "BlockLayout",
    "EMPTY", "FULL", "CAUSAL", "ANTICAUSAL", "MASKED",
    "Full", "Causal", "SlidingWindow", "Strided", "BlockLocal", "Global", "RandomBlocks",
    "Longformer", "BigBird", "BlockWindow",
]
