"""Transformer encoder and decoder layers whose attention is any mechanism.

Drop-ins for ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
(Vaswani et al., 2017, arXiv:1706.03762): the same constructor arguments in the same
order with the same defaults (note ``batch_first=False`` as in torch, unlike
:class:`MultiheadAttention`), the same submodule names (so ``state_dict`` keys are
identical and torch's weights load unchanged) and the same forward signatures. With
full attention the outputs match torch's. Added, keyword-only:

* ``attention=``: the self-attention mechanism ("full", a registry name or a Pattern),
* ``cross_attention=`` (decoder): the mechanism of the attention over ``memory``,
* ``num_kv_heads=``: grouped-query attention,
* ``forward(..., cache=)``: incremental decoding with a :class:`KVCache` (causal mechanisms);
  the decoder's ``new_cache()`` gives a :class:`DecoderCache`, which also keeps the projected
  keys and values of ``memory`` (a :class:`MemoryCache`: computed at the first step only).

Masks follow torch: ``*_key_padding_mask`` (B, S) bool True = ignore; ``*_mask``
(N, S) bool True = not allowed, or float added to the scores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._checks import check_bool, check_dropout, check_int, check_positive_real
from ..approx.linear import LinearAttentionState
from .cache import DecoderCache, KVCache, MemoryCache
from .multihead import MultiheadAttention

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def _activation(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}")
        return _ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation must be a string or a callable, got {type(activation).__name__}")
    return activation


def _check_layer_arguments(d_model: object, nhead: object, dim_feedforward: object, dropout: object,
                           activation: object, layer_norm_eps: object, batch_first: object, norm_first: object,
                           bias: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """The constructor arguments both layers share, checked before anything is built (the names are the
    layers' own: d_model, nhead, ...); returns the activation function."""
    d_model = check_int("d_model", d_model, minimum=1)
    nhead = check_int("nhead", nhead, minimum=1)
    if d_model % nhead:
        raise ValueError(f"d_model must be divisible by nhead, got d_model={d_model}, nhead={nhead}")
    check_int("dim_feedforward", dim_feedforward, minimum=1)
    check_dropout(dropout, "dropout")
    check_positive_real("layer_norm_eps", layer_norm_eps)
    check_bool("batch_first", batch_first)
    check_bool("norm_first", norm_first)
    check_bool("bias", bias)
    return _activation(activation)


class TransformerEncoderLayer(torch.nn.Module):
    """Self-attention + feed-forward block, post-norm (default) or pre-norm.

    Args (as torch): d_model (E), nhead (H), dim_feedforward=2048, dropout=0.1,
    activation="relu" ("relu", "gelu" or a callable), layer_norm_eps=1e-5,
    batch_first=False, norm_first=False, bias=True, device=None, dtype=None.
    Keyword-only: attention="full" (see :class:`MultiheadAttention`), num_kv_heads=None.
    Checked before anything is built: d_model, nhead, dim_feedforward ints >= 1 (d_model divisible by
    nhead), dropout in [0, 1], layer_norm_eps a positive finite real, the flags bools.

    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False, *, cache=None):
        src (B, N, E) if batch_first else (N, B, E) -> same shape. With ``cache`` (from
        :meth:`new_cache`), ``src`` holds only the new tokens, which attend the cached ones.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 attention: object = "full", num_kv_heads: int | None = None):
        activation = _check_layer_arguments(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                            batch_first, norm_first, bias)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, attention=attention, num_kv_heads=num_kv_heads,
                                            dropout=dropout, bias=bias, batch_first=batch_first, **factory)
        self.linear1 = torch.nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = torch.nn.Dropout(dropout)
        self.linear2 = torch.nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = torch.nn.Dropout(dropout)
        self.dropout2 = torch.nn.Dropout(dropout)
        self.activation = activation

    def new_cache(self, *, is_causal: bool = False) -> KVCache:
        """An empty cache for :meth:`forward` (see :meth:`MultiheadAttention.new_cache`)."""
        return self.self_attn.new_cache(is_causal=is_causal)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False, *,
                cache: KVCache | None = None) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal, cache)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal, cache))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal, cache):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                           need_weights=False, cache=cache)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerDecoderLayer(torch.nn.Module):
    """Self-attention + attention over ``memory`` + feed-forward, post-norm or pre-norm.

    Args: as :class:`TransformerEncoderLayer`, plus keyword-only ``cross_attention="full"``
    (a mechanism for the attention of the N targets over the S memory positions; with
    N != S a pattern sees query i at memory position i + S - N).

    forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False, *, cache=None):
        tgt (B, N, E), memory (B, S, E) (sequence-first if not batch_first) -> tgt's shape.
        With ``cache``, ``tgt`` holds only the new tokens (self-attention reads the cache; the
        memory is attended in full each call). ``cache`` a :class:`DecoderCache` (from
        :meth:`new_cache`): its ``memory`` cache projects ``memory`` to keys and values at the
        first call and reuses them (every call must pass the same memory tensor; see
        :mod:`sparse_attention.nn.cache`); a plain :class:`KVCache`: self-attention only.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 attention: object = "full", cross_attention: object = "full", num_kv_heads: int | None = None):
        activation = _check_layer_arguments(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                            batch_first, norm_first, bias)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, attention=attention, num_kv_heads=num_kv_heads,
                                            dropout=dropout, bias=bias, batch_first=batch_first, **factory)
        self.multihead_attn = MultiheadAttention(d_model, nhead, attention=cross_attention,
                                                 num_kv_heads=num_kv_heads, dropout=dropout, bias=bias,
                                                 batch_first=batch_first, **factory)
        self.linear1 = torch.nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = torch.nn.Dropout(dropout)
        self.linear2 = torch.nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = torch.nn.Dropout(dropout)
        self.dropout2 = torch.nn.Dropout(dropout)
        self.dropout3 = torch.nn.Dropout(dropout)
        self.activation = activation

    def new_cache(self, *, is_causal: bool = False, cache_memory: bool = True) -> DecoderCache:
        """Empty caches for :meth:`forward`: self-attention (see :meth:`MultiheadAttention.new_cache`)
        and, unless ``cache_memory=False``, the memory's keys and values."""
        check_bool("cache_memory", cache_memory)
        return DecoderCache(self.self_attn.new_cache(is_causal=is_causal), MemoryCache() if cache_memory else None)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, *, cache: DecoderCache | KVCache | None = None) -> torch.Tensor:
        check_bool("tgt_is_causal", tgt_is_causal)  # named here: the attention layers would say "is_causal"
        check_bool("memory_is_causal", memory_is_causal)
        if cache is None or isinstance(cache, (KVCache, LinearAttentionState)):
            self_cache, memory_cache = cache, None
        elif isinstance(cache, DecoderCache):
            self_cache, memory_cache = cache.self_attn, cache.memory
        else:
            raise TypeError(f"cache must be a DecoderCache (new_cache()), a KVCache or a LinearAttentionState, got "
                            f"{type(cache).__name__}")
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal, self_cache)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal,
                                    memory_cache)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, self_cache))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal,
                                               memory_cache))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal, cache):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                           need_weights=False, cache=cache)[0]
        return self.dropout1(x)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal, cache=None):
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False, cache=cache)[0]
        return self.dropout2(x)

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))
