"""LSH attention (Reformer; Kitaev et al., 2020, arXiv:2001.04451).

Queries and keys are hashed with the same random rotations (angular LSH:
h(x) = argmax([xR, -xR]) over ``n_buckets`` buckets, R of shape (D, n_buckets/2) drawn
from a generator seeded with ``seed``). In each of ``n_hashes`` rounds, queries and keys
are sorted by (bucket, position) and cut into C = ceil(N / bucket_size) chunks (keys into
C chunks of ceil(S / C)); query chunk c attends the keys of chunks c and c-1 (chunk 0
only its own: no wrap-around). Any N and S work.

With several rounds the result is attention over the *union* of the pairs found by any
round, each pair counted once: in every round a pair's score is lowered by the log of
the number of rounds that found it, and the rounds are merged through their
log-sum-exp (Reformer's duplicate correction), which is exactly softmax over the union.

``causal=True`` additionally drops keys after the query's position (bottom-right
aligned). With a key padding mask, padded keys (and, for self-attention, padded queries)
are sorted after every bucket, so their contents never change which real tokens share a
chunk. A causal query never attends a future key, but, as in Reformer, which past
keys share its chunk depends on the hashes of all keys (the sort is global), so
changing a future *key* can change which past keys it sees; future *values* never
matter. Memory is O(N * bucket_size * n_hashes); nothing of size N x S is built.

Execution: on CPU (no dropout, finite inputs) every round runs on PyTorch's fused flash
kernel, the sorted query chunks of all rounds as one batch of items, each against a strided
window of its round's sorted keys (previous chunk and its own), with -log(pair count) in the
additive mask; the rounds are merged through their log-sum-exps, and the backward gives the
kernel each query's merged output and log-sum-exp. Dropout, non-finite inputs and other
devices use plain differentiable ops. Both give the same pairs and results.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import native
from .._checks import check_bool, check_int, check_seed, first_order
from ..engine.blocksparse import _bwd as _kernel_bwd
from ..engine.blocksparse import _fwd as _kernel_fwd
from ..engine.blocksparse import all_finite, kernel_grad_out, kernel_grad_rows, kernel_grad_select
from .base import DynamicPattern, flat_rows, query_heads, stable_order

HASH_CHUNK_ELEMENTS = 1 << 20  # projections computed at once by LSH.hash (4 MB in float32)


class LSH(DynamicPattern):
    """Angular-LSH bucketed attention; see the module docstring.

    Args:
        bucket_size: queries per chunk (> 0); each query sees up to ~2 key chunks.
        n_hashes: hashing rounds (> 0); their pairs are united.
        n_buckets: buckets per round (even; default: about 2 * S / bucket_size, at least 2).
        seed: seed of the random rotations.
        causal: only keys at or before the query's position.
        exclude_self: Reformer's shared-QK rule (self-attention, N == S): a token does not
            attend to itself unless it has no other key.
        shared_qk: queries take the buckets of the keys at the same positions instead of being
            hashed themselves (self-attention, N == S). For Reformer, whose keys are the normalised
            queries, this is the same bucketing (the angular hash ignores a row's length) for half
            the hashing.
    """

    def __init__(self, bucket_size: int = 64, n_hashes: int = 1, *, n_buckets: int | None = None, seed: int = 0,
                 causal: bool = False, exclude_self: bool = False, shared_qk: bool = False):
        self.bucket_size = check_int("bucket_size", bucket_size, minimum=1)
        self.n_hashes = check_int("n_hashes", n_hashes, minimum=1)
        if n_buckets is not None:
            n_buckets = check_int("n_buckets", n_buckets, minimum=2)
            if n_buckets % 2:
                raise ValueError(f"n_buckets must be even (argmax over [xR, -xR]), got {n_buckets}")
        self.n_buckets = n_buckets
        self.seed = check_seed(seed)
        check_bool("causal", causal)
        self.causal = causal
        check_bool("exclude_self", exclude_self)
        self.exclude_self = exclude_self
        check_bool("shared_qk", shared_qk)
        self.shared_qk = shared_qk

    def __repr__(self) -> str:
        return (f"LSH(bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, "
                f"seed={self.seed}, causal={self.causal}, exclude_self={self.exclude_self}, "
                f"shared_qk={self.shared_qk})")

    def _check_self(self, n_q: int, n_k: int) -> None:
        for name in ("exclude_self", "shared_qk"):
            if getattr(self, name) and n_q != n_k:
                raise ValueError(f"{name} needs self-attention (N == S), got N={n_q}, S={n_k}")

    def with_restriction(self, pattern):
        raise TypeError("LSH restricted by a static pattern is not supported; use causal=True for causal LSH")

    # --- hashing and chunking ----------------------------------------------------------
    def buckets_for(self, n_k: int) -> int:
        if self.n_buckets is not None:
            return self.n_buckets
        return max(2, 2 * round(n_k / self.bucket_size))

    def rotations(self, D: int, n_k: int, device, dtype) -> torch.Tensor:
        """(n_hashes, D, n_buckets / 2) random rotations, reproducible from the seed."""
        g = torch.Generator().manual_seed(self.seed)
        r = torch.randn(self.n_hashes, D, self.buckets_for(n_k) // 2, generator=g, dtype=torch.float64)
        return r.to(device, dtype)

    @staticmethod
    def hash(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x (B, H, L, D), rot (R, D, nb/2) -> bucket ids (R, B, H, L).

        The bucket is argmax over [xR, -xR], computed without building it: the column of the largest
        |xR| (the first on ties), plus nb/2 when that projection is negative. Rows are projected in
        blocks of about HASH_CHUNK_ELEMENTS into one reused buffer: with the default n_buckets ~
        2L / bucket_size all projections at once would be O(L²) memory, and a small block stays in
        cache between the product and the two reductions.
        """
        B, H, L, D = x.shape
        R, half = rot.shape[0], rot.shape[-1]
        flat = x.reshape(B * H * L, D)
        n = flat.shape[0]
        rows = max(1, min(n, HASH_CHUNK_ELEMENTS // half))
        buf = torch.empty(rows, half, dtype=flat.dtype, device=x.device)
        out = torch.empty(R, n, dtype=torch.long, device=x.device)
        for r in range(R):
            for a in range(0, n, rows):
                p = torch.mm(flat[a:a + rows], rot[r], out=buf[:min(rows, n - a)])
                found = native.lsh_buckets(p)  # one pass (sparse_attention.native), else:
                if found is None:
                    col = p.abs().argmax(-1, keepdim=True)
                    found = (col + half * (p.gather(1, col) < 0)).squeeze(1)
                out[r, a:a + rows] = found
        return out.view(R, B, H, L)

    def _chunks(self, q, k, key_padding_mask=None):
        """Per round: sort orders and chunk ids of queries and keys.

        Returns q_order (R, B, H, N), k_order (R, B, H, S) (sorted position -> original
        index), q_chunk (R, B, H, N), k_chunk (R, B, H, S) (original index -> chunk), C, ks.
        """
        B, Hq, N, D = q.shape
        S = k.shape[2]
        G = Hq // k.shape[1]
        acc = torch.promote_types(q.dtype, torch.float32)
        with torch.no_grad():
            rot = self.rotations(D, S, q.device, acc)
            hk = self.hash(k.to(acc), rot).repeat_interleave(G, dim=2)  # keys per query head
            hq = None if self.shared_qk else self.hash(q.to(acc), rot)
            if key_padding_mask is not None:
                # padded tokens sort after every bucket, so their values never move a real
                # token's chunk (for self-attention, N == S, padded queries too)
                last = rot.shape[-1] * 2
                pad = key_padding_mask.view(1, B, 1, S)
                hk = torch.where(pad, torch.full_like(hk, last), hk)
                if hq is not None and N == S:
                    hq = torch.where(pad, torch.full_like(hq, last), hq)
            # sort by bucket, then position (stable); shared_qk: the queries' order is the keys'
            ids = rot.shape[-1] * 2 + 1  # the buckets and the padding's
            k_order = stable_order(hk, ids)
            q_order = k_order if hq is None else stable_order(hq, ids)
            C = math.ceil(N / self.bucket_size)
            ks = math.ceil(S / C)
            q_chunk = torch.empty_like(q_order).scatter_(-1, q_order, torch.arange(N, device=q.device).expand_as(
                q_order) // self.bucket_size)
            k_chunk = torch.empty_like(k_order).scatter_(-1, k_order, torch.arange(S, device=q.device).expand_as(
                k_order) // ks)
        return q_order, k_order, q_chunk, k_chunk, C, ks

    def kept(self, q, k, *, key_padding_mask=None, scale=None):
        B, H, N, _ = q.shape
        S = k.shape[2]
        self._check_self(N, S)
        _, _, q_chunk, k_chunk, _, _ = self._chunks(q, k, key_padding_mask)
        d = q_chunk.unsqueeze(-1) - k_chunk.unsqueeze(-2)  # (R, B, H, N, S)
        kept = ((d == 0) | (d == 1)).any(0) & self._static_allowed(N, S, key_padding_mask, q.device)
        if self.exclude_self:  # the diagonal stays only where it is a row's only key
            eye = torch.eye(N, dtype=torch.bool, device=q.device)
            others = (kept & ~eye).any(-1, keepdim=True)
            kept = kept & ~(eye & others)
        return kept

    def _static_allowed(self, n_q, n_k, key_padding_mask, device) -> torch.Tensor:
        m = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=device)
        if self.causal:
            pos = torch.arange(n_q, device=device) + (n_k - n_q)
            m = m & (torch.arange(n_k, device=device).view(1, -1) <= pos.view(-1, 1))
        if key_padding_mask is not None:
            m = m & ~key_padding_mask[:, None, None, :]
        return m

    # --- attention ---------------------------------------------------------------------
    def attend(self, q, k, v, *, key_padding_mask, scale, dropout_p):
        N, S = q.shape[2], k.shape[2]
        self._check_self(N, S)
        q_order, k_order, q_chunk, k_chunk, C, ks = self._chunks(q, k, key_padding_mask)
        if dropout_p == 0 and q.device.type == "cpu" and all_finite(q, k, v):
            return self._attend_kernel(q, k, v, q_order, k_order, q_chunk, k_chunk, C, ks, key_padding_mask, scale)
        return self._attend_math(q, k, v, q_order, k_order, q_chunk, k_chunk, C, ks, key_padding_mask, scale,
                                 dropout_p)

    def _attend_kernel(self, q, k, v, q_order, k_order, q_chunk, k_chunk, C, ks, key_padding_mask, scale):
        """Every round on PyTorch's fused CPU flash kernel (the rounds folded into its batch): the sorted
        queries form C items of bucket_size rows, each against a window of 2·ks sorted keys (the previous
        chunk and its own), read as a strided view of the sorted keys behind one empty chunk. With several
        rounds a pair found by c of them scores log(c) lower in each (the additive mask) and the rounds are
        merged through their log-sum-exps. Same pairs and result as _attend_math."""
        R, B, Hq, N = q_order.shape
        S = k.shape[2]
        bs = self.bucket_size
        # slot -> original index (-1: no token): queries C·bs slots; keys an empty chunk, then C·ks slots
        q_idx = F.pad(q_order, (0, C * bs - N), value=-1)  # (R, B, H, C·bs)
        k_idx = F.pad(k_order, (ks, C * ks - S), value=-1)  # (R, B, H, (C + 1)·ks)
        k_win = _windows(k_idx.view(R * B, Hq, -1, 1), ks).view(R, B, Hq, C, 2 * ks)  # a view
        q_slot = q_idx.view(R, B, Hq, C, bs)
        valid = (k_win >= 0).unsqueeze(-2)  # (R, B, H, C, 1, 2ks): key slots holding a token
        if key_padding_mask is not None:
            padded = key_padding_mask.view(1, B, 1, 1, S).expand(R, B, Hq, C, S)
            valid = valid & ~padded.gather(-1, k_win.clamp(min=0)).unsqueeze(-2)
        if self.causal:
            valid = valid & (k_win.unsqueeze(-2) <= q_slot.unsqueeze(-1) + (S - N))
        n_keys = valid.sum(-1)  # (R, B, H, C, 1 or bs)
        if R > 1:  # Reformer's duplicate correction: -log(rounds that found the pair)
            count = _pair_counts(q_chunk, k_chunk, q_slot.clamp(min=0).unsqueeze(-1), k_win.clamp(min=0).unsqueeze(-2))
            add = torch.where(valid, torch.log(count.clamp(min=1).to(q.dtype)).neg_(), float("-inf"))
        else:
            add = torch.zeros((), dtype=q.dtype).masked_fill(~valid, float("-inf"))  # the kernel's additive mask
        if self.exclude_self:  # a query's own key only when no round found it another key
            add, n_keys = _drop_self(add, valid, n_keys, q_slot, k_order, ks, N)
        return _SortedChunks.apply(q, k, v, q_idx, k_idx, add, n_keys > 0, scale, ks)

    def _attend_math(self, q, k, v, q_order, k_order, q_chunk, k_chunk, C, ks, key_padding_mask, scale,
                     dropout_p):
        """Every round with plain differentiable ops, merged through the rounds' log-sum-exps."""
        B, Hq, N, D = q.shape
        S, Dv = k.shape[2], v.shape[3]
        acc = torch.promote_types(q.dtype, torch.float32)
        R, bs = self.n_hashes, self.bucket_size
        kx, vx = query_heads(k, Hq), query_heads(v, Hq)  # (B, Hq, S, ·)
        # sorted, padded to whole chunks: queries (R, B, H, C*bs), keys (R, B, H, C*ks)
        pad_q, pad_k = C * bs - N, C * ks - S
        qo = torch.nn.functional.pad(q_order, (0, pad_q), value=-1)
        ko = torch.nn.functional.pad(k_order, (0, pad_k), value=-1)
        qi, ki = qo.clamp(min=0), ko.clamp(min=0)

        def take(x, idx):  # x (B, H, L, E), idx (R, B, H, M) -> (R, B, H, M, E)
            return x.unsqueeze(0).expand(R, *x.shape).gather(3, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))

        qs = take(q.to(acc), qi).view(R, B, Hq, C, bs, D)
        k_cur = take(kx.to(acc), ki).view(R, B, Hq, C, ks, D)
        v_cur = take(vx.to(acc), ki).view(R, B, Hq, C, ks, Dv)
        k_prev = torch.cat([torch.zeros_like(k_cur[:, :, :, :1]), k_cur[:, :, :, :-1]], 3)
        v_prev = torch.cat([torch.zeros_like(v_cur[:, :, :, :1]), v_cur[:, :, :, :-1]], 3)
        keys = torch.cat([k_cur, k_prev], 4)  # (R, B, H, C, 2ks, D)
        vals = torch.cat([v_cur, v_prev], 4)
        kidx = torch.cat([ko.view(R, B, Hq, C, ks), torch.cat([
            torch.full_like(ko.view(R, B, Hq, C, ks)[:, :, :, :1], -1), ko.view(R, B, Hq, C, ks)[:, :, :, :-1]], 3)],
            4)  # original key index per slot, -1 = none
        qidx = qo.view(R, B, Hq, C, bs)
        s = torch.matmul(qs, keys.transpose(-1, -2)) * scale  # (R, B, H, C, bs, 2ks)
        valid = (kidx.unsqueeze(-2) >= 0) & (qidx.unsqueeze(-1) >= 0)
        kq = kidx.clamp(min=0).unsqueeze(-2)  # (R, B, H, C, 1, 2ks)
        qq = qidx.clamp(min=0).unsqueeze(-1)  # (R, B, H, C, bs, 1)
        if self.causal:
            valid = valid & (kq <= qq + (S - N))
        if key_padding_mask is not None:
            padded = key_padding_mask[None, :, None, None, None, :].expand(R, B, Hq, C, 1, S)
            valid = valid & ~padded.gather(-1, kq.expand(R, B, Hq, C, 1, 2 * ks))
        # (the previous-chunk slots of chunk 0 and key slots past S hold kidx -1: never valid)
        # Reformer's duplicate correction: a pair found by c rounds scores log(c) lower in each
        s = s - torch.log(_pair_counts(q_chunk, k_chunk, qq, kq).clamp(min=1).to(s.dtype))
        if self.exclude_self:  # a query's own key only when no round found it another key
            is_self = kq == qq
            other = (valid & ~is_self).any(-1).to(acc).reshape(R, B, Hq, C * bs, 1)
            has_other = _unsort(other, qo, N)[..., 0].amax(0) > 0  # (B, H, N)
            slot_has_other = has_other.unsqueeze(0).expand(R, -1, -1, -1).gather(3, qi).view(qq.shape)
            valid = valid & ~(is_self & slot_has_other)
        s = s.masked_fill(~valid, float("-inf"))
        lse = torch.logsumexp(s, -1)  # (R, B, H, C, bs)
        p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
        if dropout_p > 0:
            p = torch.nn.functional.dropout(p, dropout_p)
        o = torch.matmul(p, vals)  # (R, B, H, C, bs, Dv)
        # back to the original query order, then merge the rounds through their log-sum-exps
        o = _unsort(o.reshape(R, B, Hq, C * bs, Dv), qo, N)  # (R, B, H, N, Dv)
        lse = _unsort(lse.reshape(R, B, Hq, C * bs, 1), qo, N)[..., 0]  # (R, B, H, N)
        total = torch.logsumexp(lse, 0)
        w = torch.exp(lse - torch.where(torch.isneginf(total), torch.zeros_like(total), total))
        return (o * w.unsqueeze(-1)).sum(0).to(q.dtype)


def _windows(x: torch.Tensor, ks: int) -> torch.Tensor:
    """x (B, H, (C + 1)·ks, E) -> (B, H, C, 2ks, E): window c is rows c·ks .. (c + 2)·ks (chunk c - 1 of the
    sorted keys, then chunk c), a strided view."""
    B, H, L, E = x.shape
    sb, sh, sl, se = x.stride()
    return x.as_strided((B, H, L // ks - 1, 2 * ks, E), (sb, sh, ks * sl, sl, se), x.storage_offset())


def _drop_self(add, valid, n_keys, q_slot, k_order, ks, N):
    """Reformer's exclude-self rule on the kernel's mask: -inf at each query's own key where some round found
    the query another key. add, valid (R, B, H, C, 1 or bs, 2ks); n_keys (R, B, H, C, 1 or bs) keys per
    query; q_slot (R, B, H, C, bs) original query index per slot (-1 = none); k_order (R, B, H, S) the keys'
    sort order. Returns the full (R, B, H, C, bs, 2ks) mask, or (1, 1, 1, C, bs, 2ks) when it is the same for
    every round, batch entry and head, and the keys left per query. O(N) work besides the mask itself: a
    query's own key is found by its sorted position, not by comparing every pair."""
    R, B, H, C, bs = q_slot.shape
    S = k_order.shape[-1]
    k_pos = torch.empty_like(k_order).scatter_(-1, k_order, torch.arange(S, device=k_order.device).expand_as(k_order))
    # window c holds sorted keys (c - 1)·ks .. (c + 1)·ks - 1
    col = k_pos.gather(-1, q_slot.clamp(min=0).flatten(3)).view_as(q_slot) \
        - (torch.arange(C, device=q_slot.device).view(C, 1) - 1) * ks
    inside = (q_slot >= 0) & (col >= 0) & (col < 2 * ks)
    col = col.clamp(0, 2 * ks - 1).unsqueeze(-1)
    full = (R, B, H, C, bs, 2 * ks)
    own = valid.expand(full).gather(-1, col).squeeze(-1) & inside  # the query's own key is a valid key
    others = n_keys - own.to(n_keys.dtype)  # (R, B, H, C, bs) keys besides itself, per round
    if R > 1:  # any round counts: add up per original query, then read back per slot
        slot = torch.where(q_slot >= 0, q_slot, N).movedim(0, 2).reshape(B, H, -1)  # N: empty slots
        total = torch.zeros(B, H, N + 1, dtype=others.dtype, device=others.device)
        total.scatter_add_(-1, slot, others.movedim(0, 2).reshape(B, H, -1))
        others = total.gather(-1, slot).view(B, H, R, C, bs).movedim(2, 0)
    drop = own & (others > 0)
    if all(bool((x == x[:1, :1, :1]).all()) for x in (add, col, drop)):
        # the same mask for every round, batch entry and head (shared QK without padding: every query's own
        # key sits on the same diagonal of its window): one (C, bs, 2ks) copy, broadcast by the kernel
        add, col, drop, full = add[:1, :1, :1], col[:1, :1, :1], drop[:1, :1, :1], (1, 1, 1, C, bs, 2 * ks)
    add = add.expand(full).contiguous()
    add.scatter_(-1, col, add.gather(-1, col).masked_fill(drop.unsqueeze(-1), float("-inf")))
    return add, n_keys - drop.to(n_keys.dtype)


class _SortedChunks(torch.autograd.Function):
    """LSH attention of every round on the native items kernels (``native.items_forward`` / ``items_backward``:
    each chunk of sorted queries against its window of sorted keys, rows read and results added by index,
    the rounds merged per query; float32), else on the fused kernel with gathers and scatters.

    q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); q_idx (R, B, Hq, C·bs) and k_idx (R, B, Hq,
    (C + 1)·ks) the sorted slots' original indices per round (-1 = empty); add (R, B, Hq, C, bs or 1, 2ks),
    or (1, 1, 1, C, bs, 2ks) shared by all, the additive mask (-log of the pair's round count, or 0; -inf:
    not attended); has_key (R, B, Hq, C, bs or 1) bool, False where a query has no key in that round
    (output 0, LSE -inf). Returns (B, Hq, N, Dv). Either way each query's rounds are merged into one
    softmax over the union of their pairs, and the backward takes each query's merged output and LSE,
    which is exactly that softmax's gradient (its probabilities and dO·O are then the global ones). The
    native path keeps only q, k, v, the indices and the merged output; the fused kernel's folds the rounds
    into its batch, merges them through their log-sum-exps and keeps the sorted q, k, v (O(R·N·D)).
    """

    @staticmethod
    def forward(ctx, q, k, v, q_idx, k_idx, add, has_key, scale, ks):
        B, Hq, N, D = q.shape
        Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
        qrows, krows, bias = _native_items(q_idx, k_idx, add, ks, Hkv, N)
        found = native.items_forward(q.reshape(B * Hkv, -1, D), k.reshape(B * Hkv, S, D), v.reshape(B * Hkv, S, Dv),
                                     qrows, krows, bias, scale)
        ctx.native = found is not None
        if not ctx.native:
            return _SortedChunks._kernel_forward(ctx, q, k, v, q_idx, k_idx, add, has_key, scale, ks)
        out, lse = found
        lse = torch.where(torch.isneginf(lse), float("inf"), lse)  # no key: +inf, every p = 0 in the backward
        out = out.view(B, Hq, N, Dv)
        ctx.save_for_backward(q, k, v, qrows, krows, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @first_order
    def backward(ctx, g):
        if not ctx.native:
            return _SortedChunks._kernel_backward(ctx, g)
        q, k, v, qrows, krows, bias, out, lse = ctx.saved_tensors
        groups = lse.shape[0]
        grads = native.items_backward(q.reshape(*lse.shape, -1), k.reshape(groups, -1, k.shape[-1]),
                                      v.reshape(groups, -1, v.shape[-1]), g.to(out.dtype).reshape(*lse.shape, -1),
                                      out.reshape(*lse.shape, -1), lse, qrows, krows, bias, ctx.scale)
        if grads is None:  # the forward ran on these kernels: they stay available
            raise RuntimeError(f"native items backward unavailable: {native.status()}")
        dq, dk, dv = (x.view(t.shape).to(t.dtype) for x, t in zip(grads, (q, k, v), strict=True))
        return dq, dk, dv, None, None, None, None, None, None

    @staticmethod
    def _kernel_forward(ctx, q, k, v, q_idx, k_idx, add, has_key, scale, ks):
        B, Hq, N, D = q.shape
        Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
        R = q_idx.shape[0]
        C = k_idx.shape[-1] // ks - 1
        RBH = R * B * Hq
        E = max(D, Dv)  # the kernel wants one head size: zero columns change no score or output
        qflat, kflat = _rows_by_round(q_idx.clamp(min=0), Hq, N), _rows_by_round(k_idx.clamp(min=0), Hkv, S)
        qs = q.reshape(-1, D).index_select(0, qflat)
        kk, vv = k.reshape(-1, D).index_select(0, kflat), v.reshape(-1, Dv).index_select(0, kflat)
        if D != Dv:
            qs, kk, vv = (F.pad(t, (0, E - t.shape[-1])) for t in (qs, kk, vv))
        qs, kk, vv = qs.view(RBH, C, -1, E), kk.view(RBH, 1, -1, E), vv.view(RBH, 1, -1, E)
        add = add.to(qs.dtype).reshape(-1, C, add.shape[-2], add.shape[-1])  # RBH entries, or 1 broadcast
        o, lse = _kernel_fwd(qs, _windows(kk, ks).squeeze(1), _windows(vv, ks).squeeze(1), 0.0, False,
                             attn_mask=add, scale=scale)
        lse = torch.where(has_key.reshape(RBH, C, -1), lse, float("-inf"))  # the kernel says 0: no key
        # back to the original order (each round's first N slots are its sort order, a permutation of 0..N-1)
        order = q_idx[..., :N]
        slot = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=q.device).expand_as(order))
        slot = (slot + torch.arange(RBH, device=q.device).view(R, B, Hq, 1) * (C * o.shape[2])).reshape(-1)
        o_all = o.reshape(-1, E).index_select(0, slot).view(R, B, Hq, N, E)
        lse_all = lse.reshape(-1).index_select(0, slot).view(R, B, Hq, N)
        if R == 1:
            out, LSE = o_all[0], lse_all[0]
        else:  # merge the rounds: out = Σ w_r o_r / Σ w_r with w_r = exp(lse_r - max lse), LSE = log Σ exp(lse_r)
            top = lse_all.amax(0)
            w = torch.exp(lse_all - torch.where(torch.isneginf(top), 0.0, top))  # 0 where a round has no key
            total = w.sum(0)
            # divided by the sum itself, not through exp(lse_r - LSE): with scores near 1e9 and more, LSE
            # rounds to max lse and those weights would add up to the number of rounds
            out = ((o_all * w.unsqueeze(-1)).sum(0) / total.clamp_min(1e-30).unsqueeze(-1)).to(o.dtype)
            LSE = torch.where(total > 0, top + torch.log(total), float("-inf"))
        # for one round the kernel's own (sorted) output and LSE serve the backward; else the merged ones
        ctx.save_for_backward(qs, kk, vv, q_idx, slot, add, o if R == 1 else out, lse if R == 1 else LSE,
                              qflat, kflat)
        ctx.scale, ctx.ks, ctx.shapes = scale, ks, (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype)
        return out[..., :Dv].contiguous() if D != Dv else out

    @staticmethod
    def _kernel_backward(ctx, g):
        qs, kk, vv, q_idx, slot, add, o, lse, qflat, kflat = ctx.saved_tensors
        (B, Hq, N, D), (_, Hkv, S, _), (*_, Dv), q_dtype, k_dtype, v_dtype = ctx.shapes
        RBH, C, bs, E = qs.shape
        R, ks = q_idx.shape[0], ctx.ks
        # the output gradient in sorted order; empty query slots get 0
        g = g.to(qs.dtype) if D == Dv else F.pad(g.to(qs.dtype), (0, E - Dv))
        gsort = kernel_grad_out(g.reshape(-1, E), qflat, qs.shape)
        empty = q_idx < 0  # slots past N in the last chunk (none when bs divides N)
        if bool(empty.any()):
            gsort.masked_fill_(empty.view(RBH, C, bs, 1), 0.0)
        if R > 1:  # each slot's query's merged output and LSE
            o = o.reshape(-1, E).index_select(0, qflat).view(RBH, C, bs, E)
            lse = lse.reshape(-1).index_select(0, qflat).view(RBH, C, bs)
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)  # rows with no key: p = 0
        gq, gk, gv = _kernel_bwd(gsort, qs, _windows(kk, ks).squeeze(1),
                                 _windows(vv, ks).squeeze(1), o, lse, 0.0, False, attn_mask=add, scale=ctx.scale)
        dq = kernel_grad_select(gq, slot).view(R, B, Hq, N, E)  # one slot per query and round
        dq = dq[0] if R == 1 else dq.sum(0)  # (a sum over one round would copy)
        dk, dv = (_fold_windows(t, ks, kflat, B * Hkv, S, R).view(B, Hkv, S, E) for t in (gk, gv))
        return (dq[..., :D].to(q_dtype), dk[..., :D].to(k_dtype), dv[..., :Dv].to(v_dtype),
                None, None, None, None, None, None)


def _native_items(q_idx, k_idx, add, ks, Hkv, N):
    """The sorted chunks as the native items kernels take them (index tensors and a view of the mask).

    Groups are the key/value heads (B·Hkv): a group's items are the chunks of its query heads and rounds,
    (G, R, C) in order, each bs query slots (-1: empty) against its window of 2ks key slots (the previous
    chunk and its own; -1: empty). Returns qrows (B·Hkv, G·R·C, bs) into the group's G·N query rows,
    krows (B·Hkv, G·R·C, 2ks) into its S key rows, and the mask as a (B, Hkv, G, R, C, bs, 2ks) view (not
    copied)."""
    R, B, Hq = q_idx.shape[:3]
    G = Hq // Hkv
    C = k_idx.shape[-1] // ks - 1
    bs = q_idx.shape[-1] // C

    def by_group(x):  # (R, B, Hq, C, ...) -> (B, Hkv, G, R, C, ...)
        return x.view(R, B, Hkv, G, *x.shape[3:]).movedim(0, 3)

    head = (torch.arange(G, device=q_idx.device) * N).view(1, 1, G, 1, 1, 1)  # each query head's rows in its group
    q_slots = by_group(q_idx.view(R, B, Hq, C, bs))
    qrows = torch.where(q_slots >= 0, q_slots + head, -1).reshape(B * Hkv, G * R * C, bs)
    k_win = _windows(k_idx.view(R * B, Hq, -1, 1), ks).view(R, B, Hq, C, 2 * ks)
    krows = by_group(k_win).reshape(B * Hkv, G * R * C, 2 * ks)
    bias = by_group(add.expand(R, B, Hq, C, bs, 2 * ks))
    return qrows, krows, bias


def _rows_by_round(idx: torch.Tensor, Hx: int, L: int) -> torch.Tensor:
    """idx (R, B, Hq, M) indices into L rows of x (B, Hx, L, ·) (query head h reads head h // (Hq // Hx)) ->
    flat row indices into x.reshape(B·Hx·L, ·), in (R, B, Hq, M) order."""
    R, B, H, M = idx.shape
    return flat_rows(idx.movedim(0, 2), Hx, L).view(B, H, R, M).movedim(2, 0).reshape(-1)


def _fold_windows(gw: torch.Tensor, ks: int, kflat: torch.Tensor, groups: int, S: int, R: int) -> torch.Tensor:
    """Gradients of the key windows (R·B·Hq, C, 2ks, E) -> per original key row (groups · S, E), groups =
    B·Hkv. Sorted chunk c sits in window c (second half) and window c + 1 (first half); kflat maps the
    sorted slots (the empty front chunk first) to rows, where query heads sharing a key/value head add up.

    With one round, on CPU in float32, the native scatter adds every window row to its key's row in one
    pass (each key/value head's rows in parallel: its query heads' windows are consecutive); window 0's
    first half (the empty front chunk) is skipped. Otherwise: chunk c's two halves added up, then index_add_.
    """
    BH, C, _, E = gw.shape
    if R == 1 and gw.dtype == torch.float32 and gw.device.type == "cpu":
        win = _windows(kflat.view(BH, 1, -1, 1), ks).clone(memory_format=torch.contiguous_format).view(BH, C, 2 * ks)
        win[:, 0, :ks] = -1
        src, idx = kernel_grad_rows(gw, win.view(-1))
        out = native.scatter_groups(torch.ones(src.shape[0], 1), idx.view(-1, 1), src, groups, S)
        if out is not None:
            return out
    own = gw[:, :, ks:].contiguous()  # (BH, C, ks, E): chunk c in its own window (a copy)
    own[:, :-1] += gw[:, 1:, :ks]  # ... and as the previous chunk of window c + 1
    return gw.new_zeros(groups * S, E).index_add_(0, kflat.view(BH, -1)[:, ks:].reshape(-1), own.view(-1, E))


def _pair_counts(q_chunk, k_chunk, qq, kq) -> torch.Tensor:
    """In how many rounds each (query slot, key slot) pair lands in the same or the previous chunk.

    q_chunk (R, B, H, N), k_chunk (R, B, H, S): chunk of every original index per round;
    qq (R, B, H, C, bs, 1), kq (R, B, H, C, 1, 2ks): original indices of the slots.
    Returns (R, B, H, C, bs, 2ks) int16. Chunk ids are compared as int16 (int32 past 32767 chunks), and
    d in {0, 1} is tested as (d & ~1) == 0: two passes per round instead of four int64 ones.
    """
    R = q_chunk.shape[0]
    small = torch.int16 if int(q_chunk.max()) < 2**15 - 1 and int(k_chunk.max()) < 2**15 - 1 else torch.int32
    qi, ki = qq.flatten(3), kq.flatten(3)
    count = None
    for r in range(R):
        qc = q_chunk[r].to(small).unsqueeze(0).expand(R, *q_chunk.shape[1:])  # round r's chunks, for every slot round
        kc = k_chunk[r].to(small).unsqueeze(0).expand(R, *k_chunk.shape[1:])
        d = qc.gather(3, qi).view(qq.shape) - kc.gather(3, ki).view(kq.shape)
        hit = d.bitwise_and_(~1) == 0
        count = hit.to(torch.int16) if count is None else count.add_(hit)
    return count


def _unsort(x: torch.Tensor, order: torch.Tensor, N: int) -> torch.Tensor:
    """x (R, B, H, M, E) in sorted order (order: sorted slot -> original index, -1 = padding) -> (R, B, H, N, E)."""
    E = x.shape[-1]
    valid = (order >= 0).unsqueeze(-1)
    src = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    out = torch.zeros(*order.shape[:3], N, E, dtype=x.dtype, device=x.device)
    return out.scatter_add(3, order.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, -1, E), src)
