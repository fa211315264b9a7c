"""Modules of the content-based mechanisms: the learned or stateful parts around the functional cores.

Like the other attention modules here they take head-split tensors,
q (B, H, N, D), k (B, H or Hkv, S, D), v (B, H or Hkv, S, Dv), and return (B, H, N, Dv);
``key_padding_mask`` is (B, S) bool with True = padding.

* ``ReformerAttention``: LSH attention with Reformer's shared query/key (one projection):
  keys are the unit-normalised queries and a token attends itself only when it has no
  other key (Kitaev et al., 2020).
* ``RoutingAttention``: k-means routing with centroids kept as a buffer and updated by
  an exponential moving average of the routed queries and keys in training mode (Roy et
  al., 2021).
* ``SinkhornAttention``: a sorting network scores block pairs from block summaries,
  Sinkhorn-normalised (soft in training, hard in eval), then block-sorted attention (Tay
  et al., 2020). The sorting network here is a per-head bilinear form of the block means
  (length-independent), instead of the paper's output layer of fixed size n_blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import native
from .._checks import (
    check_bool,
    check_int,
    check_key_padding_mask,
    check_positive_real,
    check_qkv,
    check_seed,
    first_order,
)
from ..dynamic.base import padded, query_heads
from ..dynamic.lsh import LSH
from ..dynamic.routing import Routing, check_decay, update_centroids
from ..dynamic.sinkhorn import sinkhorn, sinkhorn_attention
from ..functional import attention
from ..reference import zeros_from


class ReformerAttention(torch.nn.Module):
    """Shared-QK LSH self-attention. forward(qk (B, H, N, D), v (B, H or Hkv, N, Dv)) -> (B, H, N, Dv).

    The keys are the unit-normalised queries, hashed once (``LSH(shared_qk=True)``: a query's angular
    hash is its key's), and a token attends itself only when it has no other key.

    ``shared_qk = True`` tells :class:`~sparse_attention.nn.MultiheadAttention` to call it with the
    projected queries and values only (its key projection is then unused). Values with fewer heads
    (grouped-query attention) are read by query head h from value head h // (H // Hkv).
    """

    shared_qk = True

    def __init__(self, bucket_size: int = 64, n_hashes: int = 1, *, causal: bool = False, seed: int = 0,
                 n_buckets: int | None = None):
        super().__init__()
        self.mechanism = LSH(bucket_size, n_hashes, n_buckets=n_buckets, seed=seed, causal=causal, exclude_self=True,
                             shared_qk=True)
        self.causal = self.mechanism.causal

    def extra_repr(self) -> str:
        return repr(self.mechanism)

    def forward(self, qk: torch.Tensor, v: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None):
        k = _UnitRows.apply(qk)  # Reformer: keys are the normalised shared projection
        v = _to_query_heads(v, qk.shape[1], "v")  # k has H heads, so v must too
        return attention(qk, k, v, self.mechanism, key_padding_mask=key_padding_mask)


class _UnitRows(torch.autograd.Function):
    """F.normalize(x, dim=-1) (x / max(|x|, 1e-12)) with the backward in closed form: for |x| > eps,
    dx = (g - y (y·g)) / |x|; for shorter rows (divided by the constant eps) dx = g / eps. One pass over
    x and g instead of autograd's division and norm backwards (about 3× faster at N = 16384); in float32
    on CPU that pass is native (``native.unit_rows_backward``: one read of y and g, one write)."""

    EPS = 1e-12

    @staticmethod
    def forward(ctx, x):
        # PyTorch's own norm and division: the keys equal F.normalize's bit for bit (LSH hashes them)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        y = x / norm.clamp_min(_UnitRows.EPS)
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    @first_order
    def backward(ctx, g):
        y, norm = ctx.saved_tensors
        dx = native.unit_rows_backward(y, g, norm, _UnitRows.EPS)
        if dx is not None:
            return dx
        dot = torch.linalg.vecdot(y, g).unsqueeze(-1)
        dot = dot.masked_fill(norm <= _UnitRows.EPS, 0.0)  # rows divided by eps: y does not depend on |x|
        return torch.addcmul(g, y, dot, value=-1).div_(norm.clamp_min(_UnitRows.EPS))


def _check_inputs(module: torch.nn.Module, q, k, v, key_padding_mask, *, self_attention: bool = False):
    """The front end's checks (q, k, v shapes, dtypes and devices, the padding mask) and the module's own
    head count and size, before anything is computed; returns the validated mask."""
    B, Hq, _, N, S, D, _ = check_qkv(q, k, v)
    if Hq != module.num_heads or D != module.head_dim:
        raise ValueError(f"{type(module).__name__} was built for num_heads={module.num_heads}, "
                         f"head_dim={module.head_dim}; got q with {Hq} heads of size {D}")
    if self_attention and N != S:
        raise ValueError(f"{type(module).__name__} is self-attention: q and k must have one length, got N={N}, "
                         f"S={S}")
    return check_key_padding_mask(key_padding_mask, B, S, q.device)


def _to_query_heads(x: torch.Tensor, heads: int, name: str) -> torch.Tensor:
    """(B, Hkv, L, ·) -> (B, H, L, ·), query head h reading head h // (H // Hkv) (grouped-query attention)."""
    if x.dim() != 4 or heads % x.shape[1]:
        raise ValueError(f"{name} must be (B, Hkv, L, ·) with {heads} query heads a multiple of Hkv, got "
                         f"{tuple(x.shape)}")
    return query_heads(x, heads)


class RoutingAttention(torch.nn.Module):
    """k-means routing attention with EMA-updated centroids (a buffer, per head).

    Args: num_clusters (K), head_dim (D), num_heads (H), capacity (tokens per cluster,
    default ceil(length / K)), decay (EMA, default 0.999), causal, seed (initial centroids).
    forward(q (B, H, N, D), k, v, *, key_padding_mask=None) -> (B, H, N, Dv). In training
    mode each call first moves the centroids towards the queries and keys routed to them.
    """

    def __init__(self, num_clusters: int, head_dim: int, num_heads: int, *, capacity: int | None = None,
                 decay: float = 0.999, causal: bool = False, seed: int = 0):
        super().__init__()
        self.num_clusters = check_int("num_clusters", num_clusters, minimum=1)
        self.head_dim = head_dim = check_int("head_dim", head_dim, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        self.capacity = None if capacity is None else check_int("capacity", capacity, minimum=1)
        self.decay, self.causal = check_decay(decay), check_bool("causal", causal)
        g = torch.Generator().manual_seed(check_seed(seed))
        self.register_buffer("centroids", F.normalize(torch.randn(num_heads, num_clusters, head_dim, generator=g),
                                                      dim=-1))

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, num_heads={self.num_heads}, causal={self.causal}"

    def forward(self, q, k, v, *, key_padding_mask=None):
        key_padding_mask = _check_inputs(self, q, k, v, key_padding_mask)
        if key_padding_mask is not None:
            # Padded tokens must not steer the routing: their keys (and, in self-attention, N == S,
            # their queries) are routed as zero vectors, whatever they hold. They can still fill a
            # cluster's capacity slots (Routing's top-capacity choice does not take a mask).
            pad = key_padding_mask[:, None, :, None]  # (B, 1, S, 1)
            k = torch.where(pad, torch.zeros((), dtype=k.dtype, device=k.device), k)
            if q.shape[2] == k.shape[2]:
                q = torch.where(pad, torch.zeros((), dtype=q.dtype, device=q.device), q)
        if self.training:
            tokens = torch.cat([q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)], dim=2).detach()
            if key_padding_mask is not None:  # the k-means step sees real tokens only
                real = torch.cat([~key_padding_mask if q.shape[2] == k.shape[2] else
                                  torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device),
                                  ~key_padding_mask], dim=1)  # (B, N + S)
                tokens = tokens.transpose(1, 2)[real].transpose(0, 1).unsqueeze(0)  # (1, H, real tokens, D)
            self.centroids.copy_(update_centroids(self.centroids, tokens, decay=self.decay))
        mech = Routing(self.centroids, capacity=self.capacity, causal=self.causal)
        return attention(q, k, v, mech, key_padding_mask=key_padding_mask)


class SinkhornAttention(torch.nn.Module):
    """Sparse Sinkhorn attention with a learned block-sorting network.

    Args: head_dim (D), num_heads (H), block (tokens per block), n_iters (Sinkhorn
    iterations, default 8), temperature (default 0.75), causal. Soft sorting in training
    mode, hard (argmax) in eval mode. Self-attention: q, k, v share (B, ·, N); k and v may
    have Hkv < H heads (grouped-query attention: repeated to the query heads).
    forward(q, k, v, *, key_padding_mask=None) -> (B, H, N, Dv).
    """

    def __init__(self, head_dim: int, num_heads: int, block: int, *, n_iters: int = 8, temperature: float = 0.75,
                 causal: bool = False):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        self.block = check_int("block", block, minimum=1)
        self.n_iters = check_int("n_iters", n_iters, minimum=0)
        self.temperature = check_positive_real("temperature", temperature)
        self.causal = check_bool("causal", causal)
        std = head_dim**-0.5
        self.sort_q = torch.nn.Parameter(torch.randn(num_heads, head_dim, head_dim) * std)
        self.sort_k = torch.nn.Parameter(torch.randn(num_heads, head_dim, head_dim) * std)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, block={self.block}, causal={self.causal}"

    def block_scores(self, k: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
        """(B, H, nb, nb) sorting scores from the block means of k (causal: the query side uses the previous block)."""
        B, H, N, D = k.shape
        nb = math.ceil(N / self.block)
        keep = torch.ones(B, N, dtype=k.dtype, device=k.device)
        if key_padding_mask is not None:
            keep = (~key_padding_mask).to(k.dtype)
        pad = nb * self.block - N
        # padded keys take no part (where, not a product: a NaN or inf there would survive times 0)
        masked = k if key_padding_mask is None else torch.where(key_padding_mask[:, None, :, None], 0.0, k)
        # block sums as a product with ones: its backward writes one contiguous gradient for k (a sum over the
        # block dimension would expand its gradient and then copy it into k's shape)
        ones = torch.ones(1, self.block, dtype=k.dtype, device=k.device)
        kb = torch.matmul(ones, padded(masked, (0, 0, 0, pad)).view(B, H, nb, self.block, D)).squeeze(-2)
        counts = F.pad(keep, (0, pad)).view(B, 1, nb, self.block).sum(-1, keepdim=True).clamp_min(1)
        summary = kb / counts  # (B, H, nb, D)
        query_side = summary
        if self.causal:  # row i may only depend on blocks before it
            query_side = torch.cat([torch.zeros_like(summary[:, :, :1]), summary[:, :, :-1]], 2)
        a = torch.einsum("bhid,hde->bhie", query_side, self.sort_q)
        b = torch.einsum("bhjd,hde->bhje", summary, self.sort_k)
        return torch.matmul(a, b.transpose(-1, -2)) * D**-0.5

    def forward(self, q, k, v, *, key_padding_mask=None):
        key_padding_mask = _check_inputs(self, q, k, v, key_padding_mask, self_attention=True)
        if 0 in q.shape[:3]:  # no batch entry, head or token
            return zeros_from((*q.shape[:3], v.shape[-1]), q, k, v)
        # grouped-query attention: each query head sorts and reads its group's key/value head
        k, v = _to_query_heads(k, q.shape[1], "k"), _to_query_heads(v, q.shape[1], "v")
        p = sinkhorn(self.block_scores(k, key_padding_mask), self.n_iters, temperature=self.temperature,
                     hard=not self.training, causal=self.causal)
        return sinkhorn_attention(q, k, v, p, block=self.block, causal=self.causal, key_padding_mask=key_padding_mask)
