"""Key/value caches for incremental (token-by-token or chunked) causal decoding.

* :class:`KVCache`: self-attention; each step appends the new tokens' keys and values.
* :class:`MemoryCache`: cross-attention over a fixed ``memory`` (an encoder's output); its
  keys and values are projected on the first step and reused by every later one.
* :class:`DecoderCache`: both, for one :class:`~sparse_attention.nn.TransformerDecoderLayer`
  (what its ``new_cache()`` returns).

A decoder that generates one token at a time would recompute the keys and values of
the whole prefix at every step; the cache keeps them. ``sparse_attention.attention``
aligns queries bottom-right (query i of N sits at key position i + S - N), so a chunk of
n new queries attended against the cached keys plus its own n keys sits exactly at the
end, which is where it belongs in the sequence.

Two storage policies:

* ``window=None`` (for :class:`~sparse_attention.Causal`): every key is kept; the cache
  grows with the generated length.
* ``window=W`` (for ``SlidingWindow(W, causal=True)``): a query at position t attends
  keys t-W .. t, so only the last W keys of the past can ever be read again. They live
  in a ring buffer of W slots, allocated once; memory is constant in the generated
  length. A chunk of n queries reads the W cached keys plus its own n keys::

      ring (W=3, 5 tokens seen):   slot 0 1 2  holds positions 3 4 2
      next chunk (n=2) attends:    positions 2 3 4 | 5 6   (W + n keys, in order)

Usage (one layer; a model keeps one cache per layer)::

    mha = sa.nn.MultiheadAttention(E, H, attention=sa.SlidingWindow(256, causal=True)).eval()
    cache = mha.new_cache()                    # ring of 256 slots
    for x_t in chunks:                         # (B, n, E), n = 1 for token-by-token
        y_t, _ = mha(x_t, x_t, x_t, need_weights=False, cache=cache)

Only the key positions a pattern reads through its *relative* offsets survive this
trimming, which is why the ring is offered for the sliding window only; any causal
pattern is exact with ``window=None`` because the untrimmed cache keeps absolute
positions (S = tokens seen).

Cross-attention. The memory does not change while a sequence is generated, so projecting
it to keys and values at every step repeats the same O(S·E²) work. A :class:`MemoryCache`
holds them after the first call; later calls project the new queries only. A call with the
cache returns exactly what the same call without it returns. A decoder layer keeps both
caches in a :class:`DecoderCache`::

    dec = sa.nn.TransformerDecoderLayer(E, H, batch_first=True, attention="causal").eval()
    cache = dec.new_cache()                    # DecoderCache: self-attention KVCache + MemoryCache
    memory = encoder(src)                      # (B, S, E), fixed for the whole generation
    y = bos                                    # (B, 1, E)
    for _ in range(steps):
        h = dec(y, memory, cache=cache)        # memory projected at the first step only
        y = next_token_embedding(h)            # (B, 1, E)
    cache.reset()                              # before generating from another memory

The memory cache checks that every call passes the very tensor it was filled from
(``memory is`` the first step's memory) and raises ValueError otherwise, so a stale cache is
never read: call :meth:`MemoryCache.reset` (or take a new cache) for a new memory.

Step-by-step decoding equals the full causal pass when the cross-attention treats every query
alike whatever its position (full attention, the default; Top-k): a cross-attention *pattern*
aligns query i of N at memory position i + S - N, which depends on how many queries a call has.
"""

from __future__ import annotations

import torch

from .._checks import check_int
from ..approx.linear import LinearAttentionState


class KVCache:
    """Keys and values of the tokens decoded so far, for one attention layer.

    Args:
        window: None (default) keeps every key; an int W >= 0 keeps the last W keys in a
            ring buffer (use with ``SlidingWindow(W, causal=True)``).

    Shapes: keys (B, Hkv, S, D), values (B, Hkv, S, Dv); new chunks (B, Hkv, n, ·).
    ``key_padding_mask`` chunks are (B, n) bool with True = padding.

    The cache stores detached tensors: gradients reach the current chunk's keys and values
    only (decoding is inference). Without a window every update concatenates, O(S) per step.

    Create one per layer and per generation (``MultiheadAttention.new_cache()`` picks the
    window from the layer's pattern); call :meth:`reset` to start a new sequence.
    """

    def __init__(self, *, window: int | None = None):
        self.window = None if window is None else check_int("window", window, minimum=0)
        self.reset()

    def reset(self) -> None:
        """Forget every token (the ring buffer is reallocated on the next update)."""
        self.k: torch.Tensor | None = None  # (B, Hkv, S or W, D)
        self.v: torch.Tensor | None = None
        self.padding: torch.Tensor | None = None  # (B, S or W) bool, None = no padding seen
        self.seen = 0  # tokens appended since the last reset

    def __len__(self) -> int:
        """Number of cached keys a new query can read (min(seen, W) for a ring)."""
        return self.seen if self.window is None else min(self.seen, self.window)

    def nbytes(self) -> int:
        """Bytes held by the stored keys, values and padding flags."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.padding) if t is not None)

    def _check_chunk(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a (B, Hkv, n, D) tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v chunks must agree on (B, Hkv, n), got {tuple(k.shape)} and {tuple(v.shape)}")
        if self.k is not None and (self.k.shape[:2] != k.shape[:2] or self.k.shape[3] != k.shape[3]
                                   or self.v.shape[3] != v.shape[3]):
            raise ValueError(f"chunk shape {tuple(k.shape)} does not match the cached keys {tuple(self.k.shape)}; "
                             "call reset() before decoding a different batch")
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                             or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])):
            raise ValueError(f"key_padding_mask must be a bool (B, n) = {(k.shape[0], k.shape[2])} tensor, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")

    def _ordered(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The readable cached keys/values/padding, oldest first."""
        if self.k is None:
            return None, None, None
        if self.window is None:
            return self.k, self.v, self.padding
        n = len(self)
        if n == 0:  # window 0: nothing is ever read back
            return self.k[:, :, :0], self.v[:, :, :0], None if self.padding is None else self.padding[:, :0]
        # the oldest readable key sits in slot seen % W once the ring has wrapped
        start = self.seen % self.window if self.seen >= self.window else 0
        idx = (start + torch.arange(n, device=self.k.device)) % self.window
        pad = None if self.padding is None else self.padding[:, idx]
        return self.k[:, :, idx], self.v[:, :, idx], pad

    def update(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append a chunk and return what its queries attend.

        Args:
            k: (B, Hkv, n, D) keys of the n new tokens; v: (B, Hkv, n, Dv).
            key_padding_mask: (B, n) bool, True = the new token is padding. None = no padding.
        Returns:
            (k_all, v_all, padding_all): (B, Hkv, L, ·) with L = len(self) before the update
            plus n, oldest first; the new chunk is the last n entries. padding_all is
            (B, L) bool, or None if no padding was ever given.
        """
        self._check_chunk(k, v, key_padding_mask)
        B, n = k.shape[0], k.shape[2]
        old_k, old_v, old_pad = self._ordered()
        if key_padding_mask is None and old_pad is not None:
            key_padding_mask = torch.zeros(B, n, dtype=torch.bool, device=k.device)
        if key_padding_mask is not None and old_pad is None and old_k is not None:
            old_pad = torch.zeros(B, old_k.shape[2], dtype=torch.bool, device=k.device)
        if old_k is None:
            k_all, v_all, pad_all = k, v, key_padding_mask
        else:
            k_all = torch.cat([old_k, k], dim=2)  # (B, Hkv, L, D)
            v_all = torch.cat([old_v, v], dim=2)
            pad_all = None if key_padding_mask is None else torch.cat([old_pad, key_padding_mask], dim=1)
        if self.window is None:
            self.k, self.v = k_all.detach(), v_all.detach()
            self.padding = pad_all
        else:
            self._write_ring(k.detach(), v.detach(), key_padding_mask, pad_all is not None)
        self.seen += n
        return k_all, v_all, pad_all

    def _write_ring(self, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None, track_padding: bool) -> None:
        W = self.window
        B, H, n = k.shape[:3]
        if self.k is None:
            self.k = k.new_zeros(B, H, W, k.shape[3])  # allocated once, never grows
            self.v = v.new_zeros(B, H, W, v.shape[3])
        if track_padding and self.padding is None:
            self.padding = torch.zeros(B, W, dtype=torch.bool, device=k.device)
        keep = min(n, W)
        if keep == 0:
            return
        slots = (self.seen + n - keep + torch.arange(keep, device=k.device)) % W
        self.k[:, :, slots] = k[:, :, n - keep:]
        self.v[:, :, slots] = v[:, :, n - keep:]
        if self.padding is not None:
            self.padding[:, slots] = False if pad is None else pad[:, n - keep:]


class MemoryCache:
    """Projected keys and values of a fixed cross-attention memory, computed once.

    Pass it as ``MultiheadAttention.forward(..., cache=)`` with ``key``/``value`` the memory:
    the first call projects them and stores the result, (B, Hkv, S, D) and (B, Hkv, S, Dv);
    later calls with the same key and value tensors (``is``, not equal values: ValueError
    otherwise) skip their projections. Stored detached (decoding is inference): gradients
    reach the memory projections on the filling call only. ``fills`` counts the projections.
    """

    def __init__(self) -> None:
        self.fills = 0
        self.reset()

    def reset(self) -> None:
        """Forget the memory; the next call projects its key and value again."""
        self.k: torch.Tensor | None = None  # (B, Hkv, S, D)
        self.v: torch.Tensor | None = None  # (B, Hkv, S, Dv)
        self._sources: tuple[torch.Tensor, torch.Tensor] | None = None  # the key and value tensors filled from

    @property
    def filled(self) -> bool:
        return self.k is not None

    def nbytes(self) -> int:
        """Bytes held by the stored keys and values."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)

    def lookup(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored (k, v) if filled from these very ``key`` and ``value`` tensors; None if empty."""
        if self._sources is None:
            return None
        if key is not self._sources[0] or value is not self._sources[1]:
            raise ValueError("this MemoryCache was filled from another key/value (memory) tensor; call reset() "
                             "(or take a new cache) before attending a different memory")
        return self.k, self.v

    def fill(self, key: torch.Tensor, value: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the projections ``k``, ``v`` (B, Hkv, S, ·) of the inputs ``key``, ``value``."""
        self.k, self.v = k.detach(), v.detach()
        self._sources = (key, value)
        self.fills += 1


class DecoderCache:
    """The caches of one decoder layer: ``self_attn`` (a :class:`KVCache`, or for causal linear attention a
    :class:`~sparse_attention.approx.LinearAttentionState`) and ``memory`` (a :class:`MemoryCache`, or None
    to project the memory at every call)."""

    def __init__(self, self_attn: KVCache | LinearAttentionState, memory: MemoryCache | None = None):
        if not isinstance(self_attn, (KVCache, LinearAttentionState)):
            raise TypeError(f"self_attn must be a KVCache or LinearAttentionState, got {type(self_attn).__name__}")
        if memory is not None and not isinstance(memory, MemoryCache):
            raise TypeError(f"memory must be a MemoryCache or None, got {type(memory).__name__}")
        self.self_attn = self_attn
        self.memory = memory

    def reset(self) -> None:
        """Start a new sequence (and forget the memory)."""
        self.self_attn.reset()
        if self.memory is not None:
            self.memory.reset()

    def nbytes(self) -> int:
        return self.self_attn.nbytes() + (0 if self.memory is None else self.memory.nbytes())
