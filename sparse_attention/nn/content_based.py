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

from .._checks import check_int
from ..dynamic.lsh import LSH
from ..dynamic.routing import Routing, update_centroids
from ..dynamic.sinkhorn import sinkhorn, sinkhorn_attention
from ..functional import attention


class ReformerAttention(torch.nn.Module):
    """Shared-QK LSH self-attention. forward(qk (B, H, N, D), v (B, H, N, Dv)) -> (B, H, N, Dv)."""

    def __init__(self, bucket_size: int = 64, n_hashes: int = 1, *, causal: bool = False, seed: int = 0,
                 n_buckets: int | None = None):
        super().__init__()
        self.mechanism = LSH(bucket_size, n_hashes, n_buckets=n_buckets, seed=seed, causal=causal, exclude_self=True)

    def extra_repr(self) -> str:
        return repr(self.mechanism)

    def forward(self, qk: torch.Tensor, v: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None):
        k = F.normalize(qk, dim=-1)  # Reformer: keys are the normalised shared projection
        return attention(qk, k, v, self.mechanism, key_padding_mask=key_padding_mask)


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
        head_dim = check_int("head_dim", head_dim, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        self.capacity, self.decay, self.causal = capacity, decay, causal
        g = torch.Generator().manual_seed(check_int("seed", seed))
        self.register_buffer("centroids", F.normalize(torch.randn(num_heads, num_clusters, head_dim, generator=g),
                                                      dim=-1))

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, num_heads={self.num_heads}, causal={self.causal}"

    def forward(self, q, k, v, *, key_padding_mask=None):
        if self.training:
            tokens = torch.cat([q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)], dim=2).detach()
            self.centroids.copy_(update_centroids(self.centroids, tokens, decay=self.decay))
        mech = Routing(self.centroids, capacity=self.capacity, causal=self.causal)
        return attention(q, k, v, mech, key_padding_mask=key_padding_mask)


class SinkhornAttention(torch.nn.Module):
    """Sparse Sinkhorn attention with a learned block-sorting network.

    Args: head_dim (D), num_heads (H), block (tokens per block), n_iters (Sinkhorn
    iterations, default 8), temperature (default 0.75), causal. Soft sorting in training
    mode, hard (argmax) in eval mode. Self-attention: q, k, v share (B, H, N).
    forward(q, k, v, *, key_padding_mask=None) -> (B, H, N, Dv).
    """

    def __init__(self, head_dim: int, num_heads: int, block: int, *, n_iters: int = 8, temperature: float = 0.75,
                 causal: bool = False):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        self.block = check_int("block", block, minimum=1)
        self.n_iters = check_int("n_iters", n_iters, minimum=0)
        self.temperature, self.causal = temperature, causal
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
        kb = F.pad(k * keep[:, None, :, None], (0, 0, 0, pad)).view(B, H, nb, self.block, D).sum(3)
        counts = F.pad(keep, (0, pad)).view(B, 1, nb, self.block).sum(-1, keepdim=True).clamp_min(1)
        summary = kb / counts  # (B, H, nb, D)
        query_side = summary
        if self.causal:  # row i may only depend on blocks before it
            query_side = torch.cat([torch.zeros_like(summary[:, :, :1]), summary[:, :, :-1]], 2)
        a = torch.einsum("bhid,hde->bhie", query_side, self.sort_q)
        b = torch.einsum("bhjd,hde->bhje", summary, self.sort_k)
        return torch.matmul(a, b.transpose(-1, -2)) * D**-0.5

    def forward(self, q, k, v, *, key_padding_mask=None):
        if k.shape[1] != q.shape[1]:
            raise ValueError("SinkhornAttention needs as many key heads as query heads, got "
                             f"{k.shape[1]} and {q.shape[1]}")
        p = sinkhorn(self.block_scores(k, key_padding_mask), self.n_iters, temperature=self.temperature,
                     hard=not self.training, causal=self.causal)
        return sinkhorn_attention(q, k, v, p, block=self.block, causal=self.causal, key_padding_mask=key_padding_mask)
