"""Modules that own the parameters of the approximate mechanisms and call the functional core.

Each takes head-split tensors, q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), like
``sparse_attention.attention``; the q/k/v/output projections belong to the surrounding layer.
``key_padding_mask`` is (B, S) bool with True = padding (torch.nn.MultiheadAttention's polarity).

The layers people plug in (issue 5) take (B, L, E) sequences and own their projections:
``MultiheadAttention`` (drop-in for torch's, any mechanism), ``TransformerEncoderLayer`` /
``TransformerDecoderLayer``, ``KVCache`` / ``MemoryCache`` / ``DecoderCache`` (incremental
decoding; the memory's keys and values projected once), ``AttentionPooling`` and
``WindowAttention2d`` (Swin); see each class. Every head-split module above is also a
registry mechanism of kind "module": ``MultiheadAttention(E, H, attention="performer")``,
``build_attention("linformer", E, H, seq_len=4096, k=256)``.
"""

from __future__ import annotations

from .build import build_attention
from .cache import DecoderCache, KVCache, MemoryCache
from .compressed import CompressedAttention
from .content_based import ReformerAttention, RoutingAttention, SinkhornAttention
from .informer import DistillingLayer, InformerEncoder, InformerEncoderLayer
from .linear_attention import LinearAttention
from .linformer import LinformerAttention
from .multihead import MultiheadAttention
from .nystrom import NystromAttention
from .performer import PerformerAttention
from .pooling import AttentionPooling
from .synthesizer import SynthesizerAttention
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer
from .window2d import WindowAttention2d

__all__ = [
    "PerformerAttention", "LinearAttention", "LinformerAttention", "CompressedAttention", "NystromAttention",
    "SynthesizerAttention", "ReformerAttention", "RoutingAttention", "SinkhornAttention",
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "KVCache", "MemoryCache",
    "DecoderCache", "AttentionPooling",
    "WindowAttention2d", "build_attention", "InformerEncoder", "InformerEncoderLayer", "DistillingLayer",
]
