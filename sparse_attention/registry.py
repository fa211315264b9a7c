"""One registry of the mechanisms the package offers, read by tests, tools and layers.

Each entry is a frozen dataclass: name, how to build it, what it supports, and small
defaults that make a meaningful example at any length (``fixed_length`` mechanisms: up to
their default maximum length; ``global``'s two global positions need a length of 2 or more).
Unknown names raise an error listing the known ones.

Three kinds:

* ``"static"``: a :class:`~sparse_attention.Pattern` (data-independent pairs).
* ``"content"``: a :class:`~sparse_attention.DynamicPattern` (pairs chosen from q and k).
* ``"module"``: a head-split ``torch.nn.Module`` (``forward(q, k, v, *, key_padding_mask)``)
  that owns parameters or state and is sized by the layer that holds it: ``make`` needs
  ``head_dim`` and ``num_heads`` (``num_kv_heads`` defaults to ``num_heads``), which
  :class:`sparse_attention.nn.MultiheadAttention` and :func:`sparse_attention.nn.build_attention`
  supply. The approximate mechanisms (Performer, linear, Linformer, compressed, Nyström,
  Synthesizer) and the content-based ones with learned state (Routing, Sinkhorn, Reformer).

Capabilities (``sa.mechanisms()``, ``sparse-attention list``):

* ``causal``: the default configuration never attends to future keys.
* ``causal_support``: what a causal configuration (a ``causal=True`` option, or
  ``is_causal=True`` restricting a pattern) promises:

  - ``"strict"``: outputs at positions <= t never depend on tokens after t (training and
    step-by-step decoding see the same thing);
  - ``"keys"``: no future key is attended and future values never matter, but *which* past
    keys are attended is chosen from all tokens (a global sort or top-k: LSH, ProbSparse,
    Routing), so later tokens can change earlier outputs;
  - ``"none"``: no causal configuration (every compressed key mixes all positions).
* ``stochastic``: depends on a seed.
* ``learned``: holds state learned in training (trainable parameters, or Routing's centroids,
  moved by a moving average); untrained, it approximates nothing.
* ``fixed_length``: built for a maximum sequence length, the option named by ``length_option``
  (Linformer's ``seq_len``, Synthesizer's ``max_len``); longer inputs raise ValueError.
* ``self_only``: self-attention only (N == S; Sinkhorn's block sort, Reformer's shared
  query/key).

``length_defaults(n)``, where set, gives options sized for sequences of length n, which tools that
build one mechanism per length (``sparse-attention bench``) use unless told otherwise: Routing's
``num_clusters`` defaults to a small 4 (pictures), but at length n it takes ⌈√n⌉ clusters, the
Routing Transformer's choice (O(n^1.5) work; 4 clusters at n = 4096 would be slower than dense).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from . import dynamic as Dyn
from . import patterns as P

KINDS = ("static", "content", "module")
CAUSAL_SUPPORT = ("strict", "keys", "none")
#: what the layer supplies to a "module" mechanism's builder (not options of the mechanism)
LAYER_ARGS = ("head_dim", "num_heads", "num_kv_heads")


@dataclass(frozen=True)
class Mechanism:
    name: str
    build: Callable[..., object]
    kind: str  # one of KINDS
    causal: bool  # the default configuration never attends to future keys
    stochastic: bool  # depends on a seed
    defaults: dict = field(default_factory=dict)
    summary: str = ""
    learned: bool = False  # state learned in training (parameters or EMA centroids)
    length_option: str | None = None  # fixed_length mechanisms: the option holding the maximum length
    causal_support: str = "strict"  # one of CAUSAL_SUPPORT, see the module docstring
    self_only: bool = False  # self-attention only (N == S)
    length_defaults: Callable[[int], dict] | None = None  # options sized for length n (see the docstring)

    @property
    def fixed_length(self) -> bool:
        """Built for a maximum sequence length (the option ``length_option``)."""
        return self.length_option is not None

    def make(self, **options) -> object:
        """The mechanism with ``options`` over its defaults. A "module" mechanism also takes the
        layer's ``head_dim`` and ``num_heads`` (and ``num_kv_heads``, default ``num_heads``)."""
        layer = {a: options.pop(a) for a in LAYER_ARGS if a in options} if self.kind == "module" else {}
        unknown = set(options) - set(self.defaults)
        if unknown:
            valid = sorted(self.defaults) + (sorted(LAYER_ARGS) if self.kind == "module" else [])
            raise ValueError(f"unknown option(s) {sorted(unknown)} for {self.name!r}; valid: {valid}")
        if self.kind == "module":
            missing = [a for a in ("head_dim", "num_heads") if a not in layer]
            if missing:
                raise ValueError(
                    f"{self.name!r} is a module sized by its layer and needs {missing}; build it with "
                    f"sa.nn.MultiheadAttention(E, H, attention={self.name!r}) or "
                    f"sa.nn.build_attention({self.name!r}, E, H, ...)")
            if layer.get("num_kv_heads") is None:
                layer["num_kv_heads"] = layer["num_heads"]
        return self.build(**layer, **{**self.defaults, **options})


# --- builders of the "module" kind: imported lazily, nn sits above the registry ---------------


def _performer(*, head_dim, num_heads, num_kv_heads, **options):
    from .nn.performer import PerformerAttention

    return PerformerAttention(head_dim, **options)


def _linear(*, head_dim, num_heads, num_kv_heads, **options):
    from .nn.linear_attention import LinearAttention

    return LinearAttention(**options)


def _linformer(*, head_dim, num_heads, num_kv_heads, seq_len, k, per_head, share_kv):
    from .nn.linformer import LinformerAttention

    return LinformerAttention(seq_len, k, num_heads=num_kv_heads if per_head else None, share_kv=share_kv)


def _compressed(*, head_dim, num_heads, num_kv_heads, kernel_size, stride, bias):
    from .nn.compressed import CompressedAttention

    return CompressedAttention(kernel_size, stride, head_dim=head_dim, bias=bias)


def _nystrom(*, head_dim, num_heads, num_kv_heads, **options):
    from .nn.nystrom import NystromAttention

    return NystromAttention(**options)


def _synthesizer(*, head_dim, num_heads, num_kv_heads, max_len, per_head, **options):
    from .nn.synthesizer import SynthesizerAttention

    return SynthesizerAttention(max_len, num_heads=num_heads if per_head else 1, head_dim=head_dim, **options)


def _routing(*, head_dim, num_heads, num_kv_heads, num_clusters, **options):
    from .nn.content_based import RoutingAttention

    return RoutingAttention(num_clusters, head_dim, num_heads, **options)


def _sinkhorn(*, head_dim, num_heads, num_kv_heads, block, **options):
    from .nn.content_based import SinkhornAttention

    return SinkhornAttention(head_dim, num_heads, block, **options)


def _reformer(*, head_dim, num_heads, num_kv_heads, **options):
    from .nn.content_based import ReformerAttention

    return ReformerAttention(**options)


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
              "Informer: top-u queries attend, the rest output mean(V)", causal_support="keys"),
    Mechanism("lsh", Dyn.LSH, "content", False, True, {"bucket_size": 16, "n_hashes": 1, "seed": 0, "causal": False},
              "Reformer: angular-LSH buckets, sorted chunks", causal_support="keys"),
    # --- head-split modules, sized by the layer (see the module docstring) ---
    Mechanism("performer", _performer, "module", False, True,
              {"num_features": None, "causal": False, "seed": 0, "redraw_interval": None, "chunk_size": 64,
               "eps": 1e-6},
              "Performer: linear attention with FAVOR+ random features (a buffer)"),
    Mechanism("linear", _linear, "module", False, False,
              {"feature_map": "elu", "causal": False, "chunk_size": 64, "eps": 1e-6},
              "linear attention, elu+1 (or relu) features, no parameters"),
    Mechanism("linformer", _linformer, "module", False, False,
              {"seq_len": 256, "k": 32, "per_head": False, "share_kv": False},
              "Linformer: K, V projected from seq_len to k positions (learned)",
              learned=True, length_option="seq_len", causal_support="none"),
    Mechanism("compressed", _compressed, "module", False, False, {"kernel_size": 3, "stride": None, "bias": True},
              "memory-compressed: K, V shortened by a strided convolution (learned)",
              learned=True, causal_support="none"),
    Mechanism("nystrom", _nystrom, "module", False, False, {"num_landmarks": 8, "pinv_iterations": 6},
              "Nystromformer: segment-mean landmarks (needs S >= num_landmarks)",
              causal_support="none"),
    Mechanism("synthesizer", _synthesizer, "module", False, False,
              {"max_len": 256, "mode": "dense", "per_head": False, "hidden": None, "rank": None, "fixed": False,
               "mix": False, "causal": False},
              "Synthesizer: learned attention logits up to max_len positions", learned=True,
              length_option="max_len"),
    Mechanism("routing", _routing, "module", False, True,
              {"num_clusters": 4, "capacity": None, "decay": 0.999, "causal": False, "seed": 0},
              "Routing Transformer: k-means routing, centroids moved by EMA in training", learned=True,
              causal_support="keys", length_defaults=lambda n: {"num_clusters": math.isqrt(max(n, 1) - 1) + 1}),
    Mechanism("sinkhorn", _sinkhorn, "module", False, False,
              {"block": 16, "n_iters": 8, "temperature": 0.75, "causal": False},
              "Sparse Sinkhorn: learned block sorting, then block-local attention", learned=True, self_only=True),
    Mechanism("reformer", _reformer, "module", False, True,
              {"bucket_size": 16, "n_hashes": 1, "causal": False, "seed": 0},
              "Reformer: LSH attention with shared query/key (the layer's key projection is unused)",
              causal_support="keys", self_only=True),
)

REGISTRY: dict[str, Mechanism] = {m.name: m for m in _ENTRIES}


def mechanisms(kind: str | None = None) -> list[Mechanism]:
    """Every registered mechanism, or those of one ``kind`` ("static", "content" or "module")."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be None or one of {list(KINDS)}, got {kind!r}")
    return [m for m in REGISTRY.values() if kind is None or m.kind == kind]


def get(name: str) -> Mechanism:
    if name not in REGISTRY:
        raise ValueError(f"unknown mechanism {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]
