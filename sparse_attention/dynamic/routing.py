"""Routing attention (Routing Transformer; Roy et al., 2021, arXiv:2003.05997).

Queries and keys are routed to ``num_clusters`` centroids by k-means; a query attends
the keys of the clusters it belongs to. Assignment is balanced as in the paper's
implementation: every centroid takes its ``capacity`` most similar queries and its
``capacity`` most similar keys (cosine similarity; default capacity ceil(N / K) and
ceil(S / K)), so a token can belong to several clusters or to none. A query's keys are
the *union* over its clusters, each pair counted once (the score of a pair shared by c
clusters is lowered by log c in each, then the clusters are merged through their
log-sum-exps). A query in no cluster, or whose clusters hold no allowed key, outputs 0.
With a key padding mask, padded keys (and, for self-attention, padded queries) are ranked last
in every cluster, so padding takes a slot only when too few real tokens are left.

The functional mechanism takes the centroids (H or 1, K, D); ``update_centroids``
performs the exponential-moving-average k-means step a module applies during training.

Execution: on CPU (no dropout, finite inputs) the clusters run as a batch of items, on the native
items kernels in float32 (``sparse_attention/native/items.c``: each cluster's rows read by index,
outputs and gradients added into the tokens' rows) or else on PyTorch's fused flash kernel over
gathered items, merged exactly through their log-sum-exps; the backward uses each query's merged
output and log-sum-exp. Otherwise plain differentiable ops compute the same thing.

Memory: O(N·(w + m)) per head (w tokens per cluster, m the most clusters a token is in): the
similarities to the centroids are scored for a block of clusters at a time, and the pair counts come
from each token's list of clusters, so nothing of size N x K exists even when K grows with N (e.g.
K = N / 64).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .. import native
from .._checks import check_bool, check_int, first_order
from ..engine.blocksparse import _bwd as _kernel_bwd
from ..engine.blocksparse import _fwd as _kernel_fwd
from ..engine.blocksparse import all_finite, kernel_grad_out, kernel_grad_rows
from .base import DynamicPattern, gather_rows, padded, query_heads, stable_order
from .topk import top_k

SIM_CHUNK_ELEMENTS = 1 << 22  # token-to-centroid similarities (and one-hot rows) built at once (16 MB in float32)
_NORM_EPS = 1e-12  # F.normalize's


def _sim_blocks(BH: int, K: int, L: int) -> tuple[int, int]:
    """(clusters, heads) per block of token-to-centroid similarities: BH heads, K clusters, L tokens."""
    step = max(1, min(K, SIM_CHUNK_ELEMENTS // max(1, L)))
    return step, max(1, min(BH, SIM_CHUNK_ELEMENTS // (step * max(1, L))))


def _normalize_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.to(_normalize_dtype(x)), dim=-1, eps=_NORM_EPS)


class Routing(DynamicPattern):
    """k-means routing attention with given centroids; see the module docstring.

    Args:
        centroids: (K, D) or (H, K, D) cluster centres (per query head, or shared).
        capacity: tokens per cluster (default ceil(length / K) for queries and keys alike).
        causal: only keys at or before the query's position.
    """

    def __init__(self, centroids: torch.Tensor, *, capacity: int | None = None, causal: bool = False):
        if not isinstance(centroids, torch.Tensor) or centroids.dim() not in (2, 3):
            raise ValueError("centroids must be a (K, D) or (H, K, D) tensor, got "
                             f"{getattr(centroids, 'shape', centroids)!r}")
        if centroids.shape[-2] == 0:
            raise ValueError("num_clusters must be >= 1, got centroids with 0 rows")
        self.centroids = centroids.detach()
        self.capacity = None if capacity is None else check_int("capacity", capacity, minimum=1)
        check_bool("causal", causal)
        self.causal = causal

    def __repr__(self) -> str:
        return f"Routing(num_clusters={self.num_clusters}, capacity={self.capacity}, causal={self.causal})"

    def with_restriction(self, pattern):
        raise TypeError("Routing restricted by a static pattern is not supported; use causal=True")

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[-2]

    def _members(self, x: torch.Tensor, H: int, padding: torch.Tensor | None = None,
                 buf: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H, L, D) -> (B, H, K, w) indices of each cluster's w most similar tokens (cosine).

        ``padding`` (B, L) bool, True = padding: padded tokens come after every real token in each
        cluster's ranking, so they take a slot only when fewer than w real tokens are left. The
        similarities are scored for a block of clusters of a group of heads at a time (up to
        SIM_CHUNK_ELEMENTS, one batched matmul per block; its heads share one top-k call), so no L x K
        tensor exists: with K growing with L it would be O(L²). The tokens are not normalised: a block's
        scores against the unit centroids are scaled by each token's inverse norm in place, which ranks
        alike without a normalised copy of x. ``buf`` (optional, a flat tensor of x's dtype; replaced
        when too small) holds the blocks; a caller scoring queries and keys passes one to both. Members
        come in no particular order within a cluster (``topk.top_k``).
        """
        B, _, L, D = x.shape
        if self.centroids.shape[-1] != D:
            raise ValueError(f"centroids have dim {self.centroids.shape[-1]} but q/k have head dim {D}")
        c = self.centroids.to(x.device)
        c = c.unsqueeze(0) if c.dim() == 2 else c
        if c.shape[0] not in (1, H):
            raise ValueError(f"centroids are per head for {c.shape[0]} heads, but q has {H} heads")
        K = c.shape[1]
        w = min(L, self.capacity or math.ceil(L / K))
        with torch.no_grad():
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            inv = torch.linalg.vector_norm(x, dim=-1).clamp_min_(_NORM_EPS).reciprocal_().view(B * H, 1, L)
            xt = x.transpose(-1, -2).reshape(B * H, D, L)
            cb = _normalize(c).to(x.dtype).expand(B, H, K, D).reshape(B * H, K, D)  # each head's centroids
            idx = torch.empty(B * H, K, w, dtype=torch.long, device=x.device)
            step, group = _sim_blocks(B * H, K, L)
            if buf is None or buf.numel() < group * step * L or buf.dtype != x.dtype:
                buf = torch.empty(group * step * L, dtype=x.dtype, device=x.device)
            for g0 in range(0, B * H, group):
                heads = range(g0, min(B * H, g0 + group))
                for a in range(0, K, step):
                    kc = min(step, K - a)
                    sim = buf[: len(heads) * kc * L].view(len(heads), kc, L)
                    torch.bmm(cb[g0:g0 + len(heads), a:a + kc], xt[g0:g0 + len(heads)], out=sim)
                    sim.mul_(inv[g0:g0 + len(heads)])
                    if padding is not None:
                        for i, bh in enumerate(heads):
                            sim[i].masked_fill_(padding[bh // H], float("-inf"))
                    idx[g0:g0 + len(heads), a:a + kc] = top_k(sim, w)[1]
        return idx.view(B, H, K, w)

    def _route(self, q, k, key_padding_mask=None):
        """Cluster members of queries (B, H, K, wq) and keys (B, H, K, wk), and the keys per query head;
        padded keys (and, for self-attention, N == S, padded queries) are ranked last, so how much
        padding a batch holds never takes a real token's slot."""
        H, N, S = q.shape[1], q.shape[2], k.shape[2]
        kx = query_heads(k, H)
        BH, K = q.shape[0] * H, self.num_clusters
        size = max(math.prod(_sim_blocks(BH, K, L)) * L for L in (N, S))  # one block buffer for both
        buf = torch.empty(size, dtype=_normalize_dtype(q), device=q.device)
        qi = self._members(q, H, key_padding_mask if N == S else None, buf)
        ki = self._members(kx, H, key_padding_mask, buf)
        return qi, ki, kx

    def _allowed(self, qi, ki, n_q, n_k, key_padding_mask):
        """(B, H, K, wq or 1, wk) bool for the cluster slots, or None when every pair of a cluster is
        allowed (no causal masking, no padding)."""
        m = None
        if self.causal:
            m = ki.unsqueeze(-2) <= (qi + (n_k - n_q)).unsqueeze(-1)
        if key_padding_mask is not None:
            B, H, K, wk = ki.shape
            keep = ~key_padding_mask[:, None, None, :].expand(B, H, K, -1).gather(-1, ki).unsqueeze(-2)
            m = keep if m is None else m & keep
        return m

    def kept(self, q, k, *, key_padding_mask=None, scale=None):
        B, H, N, _ = q.shape
        S = k.shape[2]
        qi, ki, _ = self._route(q, k, key_padding_mask)
        qm, km = _dense_members(qi, N), _dense_members(ki, S)
        kept = torch.einsum("bhnc,bhsc->bhns", qm.to(torch.float32), km.to(torch.float32)) > 0
        static = torch.ones(N, S, dtype=torch.bool, device=q.device)
        if self.causal:
            pos = torch.arange(N, device=q.device) + (S - N)
            static = torch.arange(S, device=q.device).view(1, -1) <= pos.view(-1, 1)
        kept = kept & static
        if key_padding_mask is not None:
            kept = kept & ~key_padding_mask[:, None, None, :]
        return kept

    def attend(self, q, k, v, *, key_padding_mask, scale, dropout_p):
        B, H, N, D = q.shape
        S, Dv = k.shape[2], v.shape[3]
        acc = torch.promote_types(q.dtype, torch.float32)
        qi, ki, kx = self._route(q, k, key_padding_mask)
        vx = query_heads(v, H)

        def take(x, idx):  # x (B, H, L, E), idx (B, H, K, w) -> (B, H, K, w, E)
            flat = idx.flatten(2)
            return x.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])).view(*idx.shape, x.shape[-1])

        # pairs shared by several clusters: count them once (each cluster lowers its copy by log(count))
        with torch.no_grad():
            bias = _pair_counts(qi, ki, N, S, acc, neg_log=True)  # (B, H, K, wq, wk) -log(count)
            allowed = self._allowed(qi, ki, N, S, key_padding_mask)  # None: all allowed
        if dropout_p == 0 and q.device.type == "cpu" and all_finite(q, k, v):
            with torch.no_grad():  # -inf where not allowed
                if allowed is None:
                    has_key = torch.ones(qi.shape, dtype=torch.bool, device=q.device)
                else:
                    bias.masked_fill_(~allowed, float("-inf"))
                    has_key = allowed.expand_as(bias).any(-1)
            return _RoutedItems.apply(q.to(acc), kx.to(acc), vx.to(acc), qi, ki, bias, has_key, scale).to(q.dtype)
        qs, ks, vs = take(q.to(acc), qi), take(kx.to(acc), ki), take(vx.to(acc), ki)
        s = torch.matmul(qs, ks.transpose(-1, -2)) * scale + bias  # (B, H, K, wq, wk)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)  # (B, H, K, wq)
        p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        o = torch.matmul(p, vs)  # (B, H, K, wq, Dv)
        # merge every query's clusters through their log-sum-exps
        flat = qi.flatten(2)  # (B, H, K*wq)
        lse_f = lse.flatten(2)
        with torch.no_grad():
            top = torch.full((B, H, N), float("-inf"), dtype=acc, device=q.device)
            top = top.scatter_reduce(2, flat, lse_f, reduce="amax")
            top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
        e = torch.exp(lse_f - top.gather(2, flat))
        total = torch.zeros(B, H, N, dtype=acc, device=q.device).scatter_add(2, flat, e)
        w = e / total.gather(2, flat).clamp_min(torch.finfo(acc).tiny)
        out = torch.zeros(B, H, N, Dv, dtype=acc, device=q.device)
        out = out.scatter_add(2, flat.unsqueeze(-1).expand(-1, -1, -1, Dv), (o.flatten(2, 3) * w.unsqueeze(-1)))
        return out.to(q.dtype)


def _dense_members(idx: torch.Tensor, L: int) -> torch.Tensor:
    """Cluster members idx (B, H, K, w) -> (B, H, L, K) bool membership (for the dense reference)."""
    B, H, K, _ = idx.shape
    return torch.zeros(B, H, L, K, dtype=torch.bool, device=idx.device).scatter_(2, idx.transpose(-1, -2), True)


def _member_lists(idx: torch.Tensor, L: int) -> torch.Tensor:
    """Cluster members idx (B, H, K, w) -> (B, H, L, m) each token's clusters, ascending, -1 after the last
    (m: the most clusters any token is in). O(L·m) instead of an L x K membership."""
    B, H, K, w = idx.shape
    tok = idx.flatten(2)  # entry e is token tok[e] in cluster e // w
    order = stable_order(tok, L)  # by token, clusters ascending within a token
    tok_sorted = tok.gather(-1, order)
    count = torch.zeros(B, H, L, dtype=torch.long, device=idx.device).scatter_add_(-1, tok, torch.ones_like(tok))
    m = max(1, int(count.max()))
    first = count.cumsum(-1) - count  # each token's first entry in the sorted order
    rank = torch.arange(K * w, device=idx.device) - first.gather(-1, tok_sorted)
    lists = torch.full((B, H, L * m), -1, dtype=torch.long, device=idx.device)
    lists.scatter_(-1, tok_sorted * m + rank, order // w)
    return lists.view(B, H, L, m)


def _pair_counts(qi: torch.Tensor, ki: torch.Tensor, N: int, S: int, dtype: torch.dtype, *,
                 neg_log: bool = False) -> torch.Tensor:
    """In how many clusters each (query slot, key slot) pair of every cluster meets: (B, H, K, wq, wk)
    (at least 1: the pair's own cluster); with ``neg_log``, -log of the count (the union softmax's bias).

    The members' cluster lists become one-hot rows over the K clusters for a block of clusters at a
    time (about SIM_CHUNK_ELEMENTS), and a row product counts the clusters both tokens are in. Memory
    stays O((N + S)·m + block), however many clusters there are.
    """
    if dtype == torch.float32:  # popcounts of bit sets (sparse_attention.native), exact alike
        counts = native.pair_counts(qi, ki, N, S, neg_log=neg_log)
        if counts is not None:
            return counts
    B, H, K, wq = qi.shape
    wk = ki.shape[-1]
    lq, lk = _member_lists(qi, N), _member_lists(ki, S)

    def onehot(lists, idx):  # the rows of idx's tokens (B, H, Kc, w, K); column K collects the -1 fillers
        m = lists.shape[-1]
        rows, _ = gather_rows(lists, idx)  # (B, H, Kc, w, m)
        rows = rows.masked_fill(rows < 0, K)
        return torch.zeros(*idx.shape, K + 1, dtype=dtype, device=idx.device).scatter_(
            -1, rows.view(*idx.shape, m), 1.0)[..., :K]

    out = torch.empty(B, H, K, wq, wk, dtype=dtype, device=qi.device)
    step = max(1, SIM_CHUNK_ELEMENTS // (B * H * max(wq, wk) * (K + 1)))
    for a in range(0, K, step):
        out[:, :, a:a + step] = torch.matmul(onehot(lq, qi[:, :, a:a + step]),
                                             onehot(lk, ki[:, :, a:a + step]).transpose(-1, -2))
    return out.log_().neg_() if neg_log else out


def _add_rows(src: torch.Tensor, idx: torch.Tensor, groups: int, rows: int,
              w: torch.Tensor | None = None) -> torch.Tensor:
    """out[idx[r]] += w[r] · src[r] (w = 1 when None) into zeros (groups · rows, E): src (R, E), idx (R,) whose
    R rows form ``groups`` equal runs, run g's indices all in [g·rows, (g+1)·rows) (a batch entry and head's
    slots and its tokens). On CPU in float32 the native scatter fills and adds each run in parallel (0.67
    against 1.25 ms for zeros + index_add_ per 8 MB at N=4096); else zeros and index_add_."""
    if src.dtype == torch.float32 and src.device.type == "cpu":
        weights = torch.ones(src.shape[0], 1) if w is None else w
        out = native.scatter_groups(weights, idx.view(-1, 1), src, groups, rows)
        if out is not None:
            return out
    src = src if w is None else src * w
    return torch.zeros(groups * rows, src.shape[-1], dtype=src.dtype, device=src.device).index_add_(0, idx, src)


class _RoutedItems(torch.autograd.Function):
    """Routing attention with every cluster as an item (its wq queries against its wk keys, with the
    additive ``bias``: -log(pair count), -inf where not allowed); a query's clusters are merged into the
    softmax over the union of its keys. The backward takes each query's *merged* output and log-sum-exp,
    which gives exactly the union softmax's gradient (p = exp(s - LSE) and D = dO·O are then the global
    ones). Both run on the native items kernels (``native.items_forward`` / ``items_backward``: rows read,
    outputs and gradients added by index, no gathered copies; float32 with vectors of 32 bytes or more),
    else on PyTorch's fused kernel over gathered items, merged through their log-sum-exps, with the
    gradients scattered back. At N=4096, H=8, 64 clusters of 64, routing fwd+bwd took 32.5-37.3 ms on the
    native pair against 45.1-46.8 ms on the fused kernel with gathers (commit 67ad646; alternating
    processes, best of 12 each).

    q (B, H, N, D), k (B, H, S, D), v (B, H, S, Dv) (keys already per query head), qi (B, H, K, wq),
    ki (B, H, K, wk), bias (B, H, K, wq, wk), has_key (B, H, K, wq) bool: whether a slot's row of bias
    holds a finite entry -> (B, H, N, Dv).
    """

    @staticmethod
    def forward(ctx, q, k, v, qi, ki, bias, has_key, scale):
        B, H, N, D = q.shape
        S, Dv = k.shape[2], v.shape[-1]
        K, wq, wk = qi.shape[2], qi.shape[3], ki.shape[3]
        BH = B * H
        add = bias.view(BH, K, wq, wk).to(q.dtype)
        found = native.items_forward(q.reshape(BH, N, D), k.reshape(BH, S, D), v.reshape(BH, S, Dv),
                                     qi.view(BH, K, wq), ki.view(BH, K, wk), add, scale)
        if found is not None:
            out, LSE = found[0].view(B, H, N, Dv), found[1]  # LSE (B·H, N)
        else:
            out, LSE = _kernel_forward(q, k, v, qi, ki, add, has_key, scale)
        ctx.save_for_backward(q, k, v, qi, ki, add, out, LSE)
        ctx.scale = scale
        return out

    @staticmethod
    @first_order
    def backward(ctx, g):
        q, k, v, qi, ki, add, out, LSE = ctx.saved_tensors
        B, H, N, D = q.shape
        S, Dv = k.shape[2], v.shape[-1]
        BH, K, wq, wk = add.shape
        g = g.to(out.dtype)
        lse = torch.where(torch.isneginf(LSE), float("inf"), LSE)  # (B·H, N); no key: every p = 0
        grads = native.items_backward(q.reshape(BH, N, D), k.reshape(BH, S, D), v.reshape(BH, S, Dv),
                                      g.reshape(BH, N, Dv), out.reshape(BH, N, Dv), lse, qi.view(BH, K, wq),
                                      ki.view(BH, K, wk), add, ctx.scale)
        if grads is None:  # the fused kernel's backward on gathered items, scattered back
            items, qflat, kflat = _items(q, k, v, qi, ki)
            E = items[0].shape[-1]

            def slot(x):  # per-query rows -> per-slot items (BH, K, wq, ·)
                return x.index_select(0, qflat).view(BH, K, wq, -1)

            gq, gk, gv = _kernel_bwd(kernel_grad_out(padded(g, (0, E - Dv)).reshape(-1, E), qflat, items[0].shape),
                                     *items, slot(padded(out, (0, E - Dv)).reshape(-1, E)),
                                     slot(lse.reshape(-1, 1))[..., 0], 0.0, False, attn_mask=add, scale=ctx.scale)

            def scatter(grad, flat, rows):  # the items' row gradients added to their tokens' rows
                return _add_rows(*kernel_grad_rows(grad, flat), BH, rows)

            grads = (scatter(gq, qflat, N)[:, :D], scatter(gk, kflat, S)[:, :D], scatter(gv, kflat, S)[:, :Dv])
        dq, dk, dv = (x.reshape(t.shape).to(t.dtype) for x, t in zip(grads, (q, k, v), strict=True))
        return dq, dk, dv, None, None, None, None, None


def _kernel_forward(q, k, v, qi, ki, add, has_key, scale):
    """The fused kernel's forward on the gathered clusters, each query's clusters merged through their
    log-sum-exps: out (B, H, N, Dv) and LSE (B·H, N)."""
    B, H, N, _ = q.shape
    Dv = v.shape[-1]
    K, wq = qi.shape[2], qi.shape[3]
    items, qflat, _ = _items(q, k, v, qi, ki)
    E = items[0].shape[-1]
    o, lse = _kernel_fwd(*items, 0.0, False, attn_mask=add, scale=scale)
    lse = torch.where(has_key.view(B * H, K, wq), lse, float("-inf")).flatten(1)  # (B·H, K·wq)
    # merge each query's clusters: out = Σ w o / Σ w with w = exp(lse - max lse), LSE = log Σ exp(lse)
    row = qi.flatten(2).view(B * H, -1)  # (B·H, K·wq) query index of every slot
    top = torch.full((B * H, N), float("-inf"), dtype=lse.dtype).scatter_reduce(1, row, lse, reduce="amax")
    top = torch.where(torch.isneginf(top), 0.0, top)
    w = torch.exp(lse - top.gather(1, row))  # 0 where lse = -inf
    total = torch.zeros_like(top).scatter_add(1, row, w)
    LSE = torch.where(total > 0, top + torch.log(total), float("-inf"))  # (B·H, N)
    # divided by the sum itself, not through exp(lse - LSE): with scores near 1e9 and more, LSE rounds to
    # max lse and those weights would add up to the number of clusters
    w = w / total.clamp_min(1e-30).gather(1, row)
    out = _add_rows(o.reshape(-1, E), qflat, B * H, N, w.reshape(-1, 1)).view(B, H, N, E)[..., :Dv]
    return out, LSE


def _items(q, k, v, qi, ki):
    """The clusters' rows as the kernel's items (B·H, K, w, E), E = max(D, Dv) (zero columns change no score or
    output: the kernel wants one head size), and the flat row indices of the queries (B·H·K·wq,) and keys."""
    B, H, _, D = q.shape
    Dv, K = v.shape[-1], qi.shape[2]
    E = max(D, Dv)
    qs, qflat = gather_rows(padded(q, (0, E - D)), qi.flatten(2))
    ks, kflat = gather_rows(padded(k, (0, E - D)), ki.flatten(2))
    vs, _ = gather_rows(padded(v, (0, E - Dv)), ki.flatten(2))
    return [t.view(B * H, K, -1, E) for t in (qs, ks, vs)], qflat, kflat


def check_decay(decay: object) -> float:
    """The moving average's decay: a real number in [0, 1)."""
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
    return float(decay)


def update_centroids(centroids: torch.Tensor, x: torch.Tensor, *, decay: float = 0.999) -> torch.Tensor:
    """One exponential-moving-average k-means step (Routing Transformer, section 4).

    centroids (H or 1, K, D) or (K, D); x (B, H, L, D) tokens (queries and keys). Each
    centroid moves towards the mean of the unit-normalised tokens nearest to it:
    c <- decay * c + (1 - decay) * mean; centroids with no token keep their value.
    Returns the new centroids (same shape); no gradient flows.
    """
    decay = check_decay(decay)
    squeeze = centroids.dim() == 2
    c = centroids.unsqueeze(0) if squeeze else centroids
    with torch.no_grad():
        acc = torch.promote_types(_normalize_dtype(x), _normalize_dtype(c))  # float32 for half tokens/centroids
        xn = _normalize(x).to(acc)  # (B, H, L, D)
        ct = _normalize(c).to(acc).transpose(-1, -2).unsqueeze(0)  # (1, H or 1, D, K)
        B, H, L, D = xn.shape
        K = c.shape[1]
        nearest = torch.empty(B, H, L, dtype=torch.long, device=x.device)
        step = max(1, SIM_CHUNK_ELEMENTS // max(1, B * H * K))  # rows of the L x K similarity at a time
        for a in range(0, L, step):
            nearest[:, :, a:a + step] = torch.matmul(xn[:, :, a:a + step], ct).argmax(-1)
        cluster = (torch.arange(H, device=x.device).view(1, H, 1) * K + nearest).flatten()  # (head, cluster) id
        sums = torch.zeros(H * K, D, dtype=acc, device=x.device).index_add_(0, cluster, xn.reshape(-1, D))
        sums = sums.view(H, K, D)
        counts = torch.bincount(cluster, minlength=H * K).view(H, K, 1).to(acc)
        if c.shape[0] == 1 and sums.shape[0] > 1:
            sums, counts = sums.sum(0, keepdim=True), counts.sum(0, keepdim=True)
        mean = sums / counts.clamp_min(1)
        new = torch.where(counts > 0, decay * c.to(acc) + (1 - decay) * mean, c.to(acc)).to(c.dtype)
    return new.squeeze(0) if squeeze else new
