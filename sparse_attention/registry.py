"""One registry of the mechanisms the package offers, read by tests, tools and layers.

Each entry is a frozen dataclass: name, how to build it, what it supports, and small
defaults that make a meaningful example at any length. Unknown names raise an error
listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import dynamic as Dyn
from . import patterns as P


@dataclass(frozen=True)
class Mechanism:
    name: str
    build: Callable[..., P.Pattern]
    kind: str  # "static" (a Pattern: data-independent) or "content" (a DynamicPattern: chosen from q, k)
    causal: bool  # the default configuration never attends to future keys
    stochastic: bool  # depends on a seed
    defaults: dict = field(default_factory=dict)
    summary: str = ""

    def make(self, **options) -> P.Pattern:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for {self.name!r}; valid: {sorted(self.defaults)}"
            )
        return self.build(**{**self.defaults, **options})


_ENTRIES = (
    Mechanism("full", P.Full, "static", False, False, {}, "every pair (dense SDPA)"),
    Mechanism("causal", P.Causal, "static", True, False, {}, "j <= i"),
    Mechanism("sliding_window", P.SlidingWindow, "static", False, False, {"window": 16, "causal": False},
              "|i - j| <= window"),
    Mechanism("causal_sliding_window", lambda window, causal: P.SlidingWindow(window, causal=causal),
              "static", True, False, {"window": 16, "causal": True}, "0 <= i - j <= window"),
    Mechanism("strided", P.Strided, "static", False, False, {"stride": 4, "causal": False},
              "(i - j) mod stride == 0"),
    Mechanism("block_local", P.BlockLocal, "static", False, False, {"block": 16}, "i // block == j // block"),
    Mechanism("global", P.Global, "static", False, False, {"indices": (0, 1)}, "i in G or j in G"),
    Mechanism("random_blocks", P.RandomBlocks, "static", False, True, {"num_blocks": 2, "block": 16, "seed": 0},
              "each query block attends random key blocks"),
    Mechanism("longformer", P.Longformer, "static", False, False,
              {"window": 8, "global_indices": (0,), "dilation": 1, "causal": False},
              "sliding window + global positions"),
    Mechanism("bigbird", P.BigBird, "static", False, True,
              {"block": 16, "window_blocks": 3, "global_blocks": 2, "random_blocks": 2, "seed": 0},
              "block window + global blocks + random blocks"),
    Mechanism("topk", Dyn.TopK, "content", False, False, {"k": 16}, "each query's k highest-scoring keys"),
    Mechanism("probsparse", Dyn.ProbSparse, "content", False, True, {"factor": 5.0, "seed": 0, "causal": False},
              "Informer: top-u queries attend, the rest output mean(V)"),
    Mechanism("lsh", Dyn.LSH, "content", False, True, {"bucket_size": 16, "n_hashes": 1, "seed": 0, "causal": False},
              "Reformer: angular-LSH buckets, sorted chunks"),
)

REGISTRY: dict[str, Mechanism] = {m.name: m for m in _ENTRIES}


def mechanisms(kind: str | None = None) -> list[Mechanism]:
    """Every registered mechanism, or those of one ``kind`` ("static" or "content")."""
    if kind not in (None, "static", "content"):
        raise ValueError(f"kind must be None, 'static' or 'content', got {kind!r}")
    return [m for m in REGISTRY.values() if kind is None or m.kind == kind]


def get(name: str) -> Mechanism:
    if name not in REGISTRY:
        raise ValueError(f"unknown mechanism {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]
