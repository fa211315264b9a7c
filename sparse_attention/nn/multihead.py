"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` that runs any mechanism.

Same parameters (``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight`` when
kdim/vdim differ from embed_dim, ``out_proj``), same forward signature and return value,
so a torch state_dict loads unchanged and, with full attention, gives the same outputs.
What differs is *which* pairs are attended (``attention=``: "full", a registry name or a
:class:`~sparse_attention.Pattern`) and how: without attention weights the call goes to
:func:`sparse_attention.attention` (block-sparse engine, memory O(N · keys per query)).

Mask polarities (they differ, as in torch; pinned by tests):

* ``key_padding_mask`` (B, S): bool **True = ignore this key** (padding), or float added
  to the scores.
* ``attn_mask`` (N, S) or (B·H, N, S): bool **True = not allowed**, or float added to the
  scores (dtype of the query).
* ``Pattern.allowed`` / ``mask()``: True = may attend (the SDPA convention).

Differences from torch, on purpose:

* A query with no allowed key gets output 0 and weights 0 (torch gives NaN).
* ``is_causal=True`` applies causal attention even without ``attn_mask`` (torch requires
  the mask as a hint); when N != S the causal mask is bottom-right aligned (query i at key
  position i + S - N), like every pattern here.
* Defaults: ``batch_first=True``; options after ``num_heads`` are keyword-only;
  ``add_bias_kv``/``add_zero_attn`` are not offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry
from .._checks import check_bool, check_dropout, check_int, check_layer_input_dtype
from ..approx.linear import LinearAttentionState
from ..dynamic.base import DynamicPattern
from ..dynamic.probsparse import ProbSparse
from ..functional import attention as sparse_attention
from ..patterns import Causal, Full, Longformer, Pattern, SlidingWindow, Strided
from ..patterns.base import Intersection, Union
from ..reference import masked_softmax
from .cache import KVCache, MemoryCache
from .linear_attention import LinearAttention
from .linformer import LinformerAttention
from .performer import PerformerAttention
from .probsparse_layer import probsparse_layer

_STATE_MECHANISMS = (LinearAttention, PerformerAttention)  # causal: decoded with a LinearAttentionState

#: largest N·S (per batch element and head) for which a sparse pattern returns dense weights.
MAX_DENSE_WEIGHTS = 1 << 22


def resolve_attention(attention: object, *, name: str = "attention", head_dim: int | None = None,
                      num_heads: int | None = None, num_kv_heads: int | None = None
                      ) -> Pattern | DynamicPattern | torch.nn.Module | None:
    """"full"/None -> None (full attention); a registry name -> its default configuration (a "module"
    mechanism is built for ``head_dim``, ``num_heads``, ``num_kv_heads``, which a name of that kind
    needs); a Pattern, a content-based DynamicPattern or a head-split module
    (forward(q, k, v, *, key_padding_mask)) -> itself."""
    if attention is None:
        return None
    if isinstance(attention, str):
        mech = registry.get(attention)
        sizes = {"head_dim": head_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
        attention = mech.make(**{k: v for k, v in sizes.items() if v is not None and mech.kind == "module"})
    if isinstance(attention, Full):
        return None
    if isinstance(attention, (Pattern, DynamicPattern, torch.nn.Module)):
        return attention
    raise TypeError(f"{name} must be 'full', a mechanism name ({sorted(registry.REGISTRY)}), a Pattern, a "
                    f"DynamicPattern or a module taking head-split q, k, v; got {type(attention).__name__}")


def check_heads(embed_dim: int, num_heads: int, num_kv_heads: int | None) -> tuple[int, int]:
    """(head_dim D, Hkv) after checking E % H == 0 and H % Hkv == 0 (num_kv_heads None = H)."""
    check_int("embed_dim", embed_dim, minimum=1)
    check_int("num_heads", num_heads, minimum=1)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                         f"num_heads={num_heads}")
    kv = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, minimum=1)
    if num_heads % kv:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, "
                         f"num_kv_heads={kv}")
    return embed_dim // num_heads, kv


def cache_window(pattern: Pattern | None) -> int | None:
    """The ring-buffer size a KV cache needs for ``pattern``: W for SlidingWindow(W, causal=True),
    None (keep everything) for other causal patterns."""
    if isinstance(pattern, SlidingWindow) and pattern.causal:
        return pattern.window
    return None


def _is_causal(pattern: object) -> bool:
    """The mechanism never attends to future keys: Causal, SlidingWindow, Strided or Longformer built with
    ``causal=True``, an intersection with such a part, a union of such parts, or a head-split module built
    with ``causal=True``."""
    if isinstance(pattern, torch.nn.Module):
        return getattr(pattern, "causal", False) is True
    if isinstance(pattern, Intersection):
        return any(_is_causal(p) for p in pattern.parts)
    if isinstance(pattern, Union):
        return all(_is_causal(p) for p in pattern.parts)
    if isinstance(pattern, (SlidingWindow, Strided, Longformer)):
        return pattern.causal
    return isinstance(pattern, Causal)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a is b``, or the same elements through another tensor object (a module with a full backward hook
    receives each argument wrapped separately)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def _views(view, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
    """``view`` of query, key and value, one view per distinct tensor: self-attention's inputs stay one
    tensor (the mechanisms that project only what they need share work when key is value)."""
    done: dict[int, torch.Tensor] = {}
    return tuple(done.setdefault(id(t), view(t)) for t in (query, key, value))


def dense_attention_with_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                 allowed: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                 dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention that also returns the weights (the path taken when weights or an
    arbitrary ``attn_mask`` are asked for).

    Args:
        q: (B, H, N, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv), H a multiple of Hkv.
        allowed: bool broadcastable to (B, H, N, S), True = may attend. None = all.
        bias: float broadcastable to (B, H, N, S), added to the scaled scores.
        dropout_p: dropout on the weights (applied whenever > 0).
    Returns:
        out (B, H, N, Dv) and weights (B, H, N, S), both in q's dtype; empty rows are 0.
    """
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1).to(compute)  # (B, H, S, D)
    v = v.repeat_interleave(G, dim=1).to(compute)
    scores = torch.matmul(q.to(compute) * (q.shape[-1] ** -0.5), k.transpose(-1, -2))  # (B, H, N, S)
    if bias is not None:
        scores = scores + bias.to(compute)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = masked_softmax(scores)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v).to(dtype), weights.to(dtype)


class MultiheadAttention(torch.nn.Module):
    """Multi-head attention with torch.nn.MultiheadAttention's parameters and forward.

    Args:
        embed_dim: E, the model width (query features and output features).
        num_heads: H; E must be divisible by H (head dim D = E // H).
        attention: "full" (default), a registry name (``sa.mechanisms()``, built with its
            defaults; a "module" mechanism such as "performer" or "linformer" is built for this
            layer's D, H and Hkv, device and dtype), a :class:`~sparse_attention.Pattern`, a content-based mechanism
            (``DynamicPattern``: TopK, ProbSparse, ...; no weights, no attn_mask, no cache; ProbSparse in
            float32/float64 projects only what its active queries need, see ``nn/probsparse_layer.py``),
            or a module taking head-split
            q (B, H, N, D), k, v (B, Hkv, S, D) and ``key_padding_mask`` (e.g.
            ``sa.nn.PerformerAttention``; such modules return no weights and take no attn_mask;
            ``LinformerAttention`` with one E for all heads applies E and F to the inputs before the key
            and value projections where that is cheaper, see ``LinformerAttention.folds_projections``;
            a shared-QK module such as ``ReformerAttention`` gets no key projection).
        num_kv_heads: Hkv key/value heads (grouped-query attention); default None = H. With
            Hkv < H the packed ``in_proj_weight`` is (E + 2·Hkv·D, E), which torch cannot load.
        dropout: dropout on the attention weights, training mode only. Default 0. A module mechanism
            (ReformerAttention, SinkhornAttention, PerformerAttention, ...) exposes no weights: there it
            drops elements of the heads' outputs (before out_proj), scaled by 1 / (1 - dropout).
        bias: biases on the input and output projections. Default True.
        kdim, vdim: key/value feature sizes; default None = E. When either differs from E
            the projections are ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``.
        batch_first: inputs (B, L, E) when True (default), (L, B, E) when False.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False, *, cache=None) -> (output, weights):
        query (B, N, E), key (B, S, kdim), value (B, S, vdim) (or sequence-first, or unbatched
        (N, E)), in the dtype of the layer's parameters (any float dtype under autocast);
        key_padding_mask (B, S) True = ignore; attn_mask (N, S) or (B·H, N, S), bool
        True = not allowed or float added. Output (B, N, E). Weights: None if not
        need_weights, else (B, N, S) averaged over heads or (B, H, N, S); for a sparse
        mechanism only while N·S <= 2**22, else ValueError. ``cache`` (a :class:`KVCache`,
        see :meth:`new_cache`): key/value are the new tokens only; they are appended to the
        cache and the queries attend the cache (causal mechanisms only). ``cache`` a
        :class:`MemoryCache` (cross-attention over a fixed memory): the first call projects
        key/value and stores them, later calls with the same key/value tensors reuse them.
        For ``LinearAttention(causal=True)`` and ``PerformerAttention(causal=True)``, ``new_cache()`` gives a
        :class:`~sparse_attention.approx.LinearAttentionState`: the new tokens attend the running
        sums of the earlier ones (constant size), and their keys are added.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, attention: object = "full",
                 num_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.head_dim, self.num_kv_heads = check_heads(embed_dim, num_heads, num_kv_heads)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else check_int("kdim", kdim, minimum=1)
        self.vdim = embed_dim if vdim is None else check_int("vdim", vdim, minimum=1)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout = check_dropout(dropout, "dropout")
        check_bool("bias", bias)
        check_bool("batch_first", batch_first)
        self.batch_first = batch_first
        self.attention = resolve_attention(attention, head_dim=self.head_dim, num_heads=num_heads,
                                           num_kv_heads=self.num_kv_heads)
        if isinstance(attention, str) and isinstance(self.attention, torch.nn.Module) and \
                (device is not None or dtype is not None):
            self.attention.to(**factory)  # built here from a name: it follows the layer's device and dtype
        heads = getattr(self.attention, "num_heads", None) if isinstance(self.attention, Pattern) else None
        if heads is not None and heads != num_heads:
            raise ValueError(f"attention is a per-head pattern with {heads} heads, but num_heads={num_heads}")
        kv_out = self.num_kv_heads * self.head_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = torch.nn.Parameter(torch.empty(embed_dim + 2 * kv_out, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = torch.nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = torch.nn.Parameter(torch.empty(kv_out, self.kdim, **factory))
            self.v_proj_weight = torch.nn.Parameter(torch.empty(kv_out, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = torch.nn.Parameter(torch.empty(embed_dim + 2 * kv_out, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation
        if self._qkv_same_embed_dim:
            torch.nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                torch.nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            torch.nn.init.zeros_(self.in_proj_bias)
            torch.nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"attention={self.attention if self.attention is not None else 'full'}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")

    # --- helpers ----------------------------------------------------------------------------
    def new_cache(self, *, is_causal: bool = False) -> KVCache | LinearAttentionState:
        """An empty :class:`KVCache` sized for this layer's mechanism (a ring of W slots for
        SlidingWindow(W, causal=True)). ``is_causal=True`` allows a non-causal mechanism, made
        causal per call by ``forward(..., is_causal=True)``. For ``LinearAttention(causal=True)`` and
        ``PerformerAttention(causal=True)``, a :class:`~sparse_attention.approx.LinearAttentionState`: the
        running sums, O(F·Dv) per head."""
        check_bool("is_causal", is_causal)
        if isinstance(self.attention, _STATE_MECHANISMS) and self.attention.causal:
            return LinearAttentionState()
        if isinstance(self.attention, torch.nn.Module):
            raise ValueError(f"a KV cache needs a causal Pattern; the module mechanism "
                             f"{type(self.attention).__name__} has no incremental decoding here")
        if _is_causal(self.attention):
            return KVCache(window=cache_window(self.attention))
        if is_causal and (self.attention is None or isinstance(self.attention, Pattern)):
            return KVCache()
        raise ValueError(f"a KV cache needs a causal mechanism (Causal or SlidingWindow(causal=True)), got "
                         f"{self.attention if self.attention is not None else 'full'}; pass is_causal=True to "
                         "decode with causal masking")

    def _in_projections(self):
        """((wq, bq), (wk, bk), (wv, bv)): the input projections' weights and biases (None without bias)."""
        E, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:E + kv], b[E + kv:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w[:E], w[E:E + kv], w[E + kv:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return (wq, bq), (wk, bk), (wv, bv)

    def _project(self, query, key, value):
        """The input projections; key and value None -> None (a MemoryCache holds them)."""
        (wq, bq), (wk, bk), (wv, bv) = self._in_projections()
        return (F.linear(query, wq, bq), None if key is None else F.linear(key, wk, bk),
                None if value is None else F.linear(value, wv, bv))

    def _check_inputs(self, query, key, value):
        wdtype = (self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight).dtype
        for name, t, feat in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() not in (2, 3):
                raise ValueError(f"{name} must be (B, L, E) / (L, B, E) or unbatched (L, E), got shape "
                                 f"{tuple(t.shape)}")
            if t.shape[-1] != feat:
                raise ValueError(f"{name} must have {feat} features in its last dim, got shape {tuple(t.shape)}")
            check_layer_input_dtype(name, t, wdtype)
        if not (query.dim() == key.dim() == value.dim()):
            raise ValueError(f"query, key and value must all be batched or all unbatched, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")

    def _attn_mask(self, attn_mask, B, N, S, dtype, device):
        """attn_mask -> (allowed bool, bias float), each None or broadcastable to (B, H, N, S)."""
        if attn_mask is None:
            return None, None
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
            raise TypeError(f"attn_mask must be bool (True = not allowed) or float of the query dtype {dtype}, "
                            f"got {attn_mask.dtype}")
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (N, S):
            m = attn_mask
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (B * self.num_heads, N, S):
            m = attn_mask.view(B, self.num_heads, N, S)
        else:
            raise ValueError(f"attn_mask must have shape (N, S) = {(N, S)} or (B*H, N, S) = "
                             f"{(B * self.num_heads, N, S)}, got {tuple(attn_mask.shape)}")
        m = m.to(device)
        return (~m, None) if m.dtype == torch.bool else (None, m)

    # --- forward ----------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, cache: KVCache | MemoryCache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_bool("need_weights", need_weights)
        check_bool("average_attn_weights", average_attn_weights)
        check_bool("is_causal", is_causal)
        self._check_inputs(query, key, value)
        if cache is not None and not isinstance(cache, (KVCache, MemoryCache, LinearAttentionState)):
            raise TypeError(f"cache must be a sparse_attention.nn.KVCache, MemoryCache or (for causal linear "
                            f"attention) sparse_attention.approx.LinearAttentionState, got {type(cache).__name__}")
        if isinstance(cache, LinearAttentionState) and not (isinstance(self.attention, _STATE_MECHANISMS)
                                                            and self.attention.causal):
            raise ValueError(f"a LinearAttentionState decodes LinearAttention or PerformerAttention with "
                             f"causal=True only, but this layer's mechanism is "
                             f"{self.attention if self.attention is not None else 'full'}")
        # a filled memory cache holds this very key/value's projections (checked on the caller's tensors)
        cached_kv = cache.lookup(key, value) if isinstance(cache, MemoryCache) else None
        shared_qk = getattr(self.attention, "shared_qk", False) is True
        if shared_qk and not _same_tensor(key, query):
            raise ValueError(f"{type(self.attention).__name__} shares queries and keys (self-attention only): "
                             "call with key the same tensor as query")
        batched = query.dim() == 3
        key_in, value_in = key, value
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = _views(lambda t: t.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = _views(lambda t: t.transpose(0, 1), query, key, value)
        B, N = query.shape[:2]
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"key and value must share (B, S) with query's B={B}, got key {tuple(key.shape)}, "
                             f"value {tuple(value.shape)} (batch-first view)")
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        # mechanisms that project only what they need (float32/64, no cache, weights or mask): ProbSparse
        # (nn/probsparse_layer.py), and Linformer with one E for all heads (E and F shorten the inputs first)
        built_causal = _is_causal(self.attention) or (isinstance(self.attention, DynamicPattern)
                                                      and getattr(self.attention, "causal", False) is True)
        # (not under autocast: the fused paths mix their own float32 sums with autocast's half projections)
        plain_call = (cache is None and not need_weights and attn_mask is None and (built_causal or not is_causal)
                      and N > 0 and key.shape[1] > 0 and query.dtype in (torch.float32, torch.float64)
                      and not torch.is_autocast_enabled(query.device.type))
        fused_probsparse = plain_call and isinstance(self.attention, ProbSparse)
        fused_linformer = plain_call and isinstance(self.attention, LinformerAttention) and \
            self.attention.folds_projections(self.kdim, Hkv, D, shared_input=key is value)
        if fused_probsparse:
            q = k = v = None
        elif fused_linformer:
            q, k, v = self._project(query, None, None)[0], None, None
        elif shared_qk and cache is None:  # the keys are the queries: no key projection
            q, _, v = self._project(query, None, value)
            k, v = None, v.view(B, v.shape[1], Hkv, D).transpose(1, 2)  # (B, Hkv, S, D); sizes given: B may be 0
        elif cached_kv is None:
            q, k, v = self._project(query, key, value)
            k = k.view(B, k.shape[1], Hkv, D).transpose(1, 2)  # (B, Hkv, S, D); sizes given: B may be 0
            v = v.view(B, v.shape[1], Hkv, D).transpose(1, 2)
            if isinstance(cache, MemoryCache):
                cache.fill(key_in, value_in, k, v)
        else:
            q = self._project(query, None, None)[0]
            k, v = cached_kv
        if q is not None:
            q = q.view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        S = key.shape[1] if k is None else k.shape[2]

        kpm_bias = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor):
                raise TypeError(f"key_padding_mask must be a tensor, got {type(key_padding_mask).__name__}")
            if tuple(key_padding_mask.shape) != (B, S):
                raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            if key_padding_mask.dtype != torch.bool:
                if key_padding_mask.dtype != query.dtype:
                    raise TypeError(f"key_padding_mask must be bool (True = ignore) or float of the query dtype "
                                    f"{query.dtype}, got {key_padding_mask.dtype}")
                if isinstance(cache, KVCache):
                    raise TypeError("key_padding_mask must be bool when decoding with a cache")
                kpm_bias, key_padding_mask = key_padding_mask[:, None, None, :], None

        pattern = self.attention
        module = isinstance(pattern, torch.nn.Module)
        # built causal already (Causal, SlidingWindow/Strided/LSH/ProbSparse/Routing with causal=True, ...): nothing
        # to restrict
        if is_causal and not built_causal:
            if module:
                raise ValueError(f"is_causal=True: the module mechanism {type(pattern).__name__} was not built "
                                 "causal and cannot be restricted per call; build it with causal=True where it "
                                 "has that option (sa.mechanisms() lists causal_support)")
            pattern = Causal() if pattern is None else pattern & Causal()  # DynamicPattern: restricted
        if isinstance(cache, KVCache):
            if module:
                raise ValueError(f"cache: the module mechanism {type(pattern).__name__} has no incremental "
                                 "decoding here; use a causal Pattern (Causal, SlidingWindow(causal=True))")
            if isinstance(pattern, DynamicPattern) or not (_is_causal(pattern) or is_causal):
                raise ValueError(f"cache needs a causal mechanism or is_causal=True, got "
                                 f"{pattern if pattern is not None else 'full'}")
            if cache.window is not None and not (isinstance(pattern, SlidingWindow) and pattern.causal
                                                 and pattern.window <= cache.window):
                raise ValueError(f"a cache with window={cache.window} keeps only the last {cache.window} keys, "
                                 f"but the mechanism is {pattern}; use KVCache() (no window) or new_cache()")
            k, v, key_padding_mask = cache.update(k, v, key_padding_mask)
            S = k.shape[2]

        dropout_p = self.dropout if self.training else 0.0
        allowed, bias = self._attn_mask(attn_mask, B, N, S, query.dtype, query.device)
        if kpm_bias is not None:
            bias = kpm_bias if bias is None else bias + kpm_bias
        weights = projected = None
        if isinstance(pattern, (torch.nn.Module, DynamicPattern)):
            if need_weights or allowed is not None or bias is not None:
                raise ValueError(f"{type(pattern).__name__} gives no attention weights and takes no attn_mask or "
                                 "float key_padding_mask; call with need_weights=False and a bool key_padding_mask")
        if isinstance(cache, LinearAttentionState):  # the new tokens against the running sums
            out = pattern(q, k, v, key_padding_mask=key_padding_mask, state=cache)
        elif module:  # shared_qk (Reformer): the keys are the queries, the key projection is not computed
            if fused_linformer:
                kc, vc = pattern.compress_inputs(key, value, *self._in_projections()[1:], Hkv,
                                                 key_padding_mask=key_padding_mask)  # (B, Hkv, K, D) each
                out = pattern.attend_compressed(q, kc, vc)
            elif shared_qk:
                out = pattern(q, v, key_padding_mask=key_padding_mask)
            else:
                out = pattern(q, k, v, key_padding_mask=key_padding_mask)
            if dropout_p:
                out = F.dropout(out, p=dropout_p)  # module mechanisms drop outputs, not weights
        elif need_weights or allowed is not None or bias is not None:
            if pattern is not None:
                if need_weights and N * S > MAX_DENSE_WEIGHTS:
                    raise ValueError(f"need_weights=True with a sparse mechanism materialises the (N, S) = {(N, S)} "
                                     f"weights (N*S={N * S} > {MAX_DENSE_WEIGHTS}); call with need_weights=False")
                pm = pattern.mask(N, S, device=q.device)  # (N, S) or (H, N, S)
                allowed = pm if allowed is None else allowed & pm
            if key_padding_mask is not None:
                keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
                allowed = keep if allowed is None else allowed & keep
            out, weights = dense_attention_with_weights(q, k, v, allowed=allowed, bias=bias, dropout_p=dropout_p)
        elif fused_probsparse:  # out_proj included
            projected = probsparse_layer(pattern, query, key, value, self._in_projections(), self.out_proj,
                                         num_heads=H, num_kv_heads=Hkv, key_padding_mask=key_padding_mask,
                                         dropout_p=dropout_p)
        else:
            out = sparse_attention(q, k, v, pattern, key_padding_mask=key_padding_mask, dropout_p=dropout_p)

        if projected is None:
            projected = self.out_proj(out.transpose(1, 2).reshape(B, N, self.embed_dim))  # (B, N, E)
        out = projected
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)  # (B, N, S)
        return out, (weights if batched else weights.squeeze(0))
