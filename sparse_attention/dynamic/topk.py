"""Top-k attention: each query attends to exactly its k highest-scoring allowed keys.

(Gupta et al., 2021, "Memory-efficient Transformers via Top-k Attention",
arXiv:2106.06899.) Every score must be computed, so the forward costs about what dense
attention costs; what top-k changes is which values are mixed. Scores are computed one query
chunk at a time and only each row's k indices and weights are kept; the backward needs only
those pairs (O(N * k * D), no score is recomputed). Memory is O(chunk * S) at a time plus
O(N * (D + k)) saved, never N x S.

Ties between equal scores are broken by the selection (deterministic for given inputs; see
``top_k``); ``kept`` reports exactly the pairs ``attend`` used.
"""

from __future__ import annotations

import warnings

import torch

from .. import native
from .._checks import check_int, check_scale
from ..patterns.base import Pattern
from ..reference import masked_softmax
from .base import DynamicPattern, allowed_mask, flat_rows, gather_rows

# Score elements per chunk (B * H * C * S): at least 16 MB in float32 ...
CHUNK_ELEMENTS = 1 << 22
# ... and, up to 64 MB, enough query rows per chunk (C) for an efficient scoring matmul: with
# B·H = 8 and S = 16384, 32 rows ran at 94 GFLOP/s here, 128 rows at 124. The chunks' scores share
# one buffer per call (a fresh 64 MB result took twice as long as the matmul writing into a reused one).
CHUNK_ROWS = 128
MAX_CHUNK_ELEMENTS = 1 << 24
# On CPU, mix the values and run the backward as products over the pairs (native kernels, else CSR
# products; False: row gathers everywhere)
SPARSE_PRODUCTS = True


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, C, D), k (B, Hkv, S, D) -> float32 (or float64) scores (B, Hq, C, S); head h reads h // G.

    The G query heads of a group are stacked as rows of one matmul (no broadcast copies). ``buffer``:
    a 1-D tensor of the scores' dtype and at least B·Hq·C·S elements to write them into.
    """
    B, Hq, C, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = (q.to(acc) * scale).reshape(B, Hkv, (Hq // Hkv) * C, D)  # (B, Hkv, G*C, D)
    out = None if buffer is None else buffer[: B * Hq * C * S].view(B, Hkv, (Hq // Hkv) * C, S)
    return torch.matmul(qs, k.to(acc).transpose(-1, -2), out=out).view(B, Hq, C, S)


def score_rows(per_row: int) -> int:
    """Rows of scores to compute at once when each row holds ``per_row`` of them: at least CHUNK_ELEMENTS
    scores, and up to CHUNK_ROWS rows while they fit in MAX_CHUNK_ELEMENTS."""
    per_row = max(per_row, 1)
    return max(1, CHUNK_ELEMENTS // per_row, min(CHUNK_ROWS, MAX_CHUNK_ELEMENTS // per_row))


def top_k(s: torch.Tensor, k: int, *, by_column: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of s (..., S), 0 <= k <= S, and their (distinct) columns
    (..., k): the same values as ``torch.topk`` (which of several equal values is kept may differ),
    in no particular order, or in ascending column order with ``by_column=True``.

    CPU float32 rows go to the native kernel when it is available (``sparse_attention.native``:
    ranked by value, NaN above every number, equal values by lower column; always in column order).
    Otherwise, when S >= 16k, torch.topk runs in two levels: the columns form G = S // g strided
    groups (g = 8, or 4 below S = 32k; group j holds columns j, j + G, j + 2G, ...); the k groups
    with the largest maxima, plus the S mod g last columns, hold a top-k of the row. (A column
    outside them is at most its group's maximum, which is at most the k-th largest group maximum,
    and those k maxima are candidates.) torch.topk over G and k·g values took 0.5-0.8x its time
    over S here (S = 1024-16384, k = 16-128).
    """
    if k > 0:
        found = native.topk_rows(s, k)
        if found is not None:
            return found
    values, cols = _torch_top_k(s, k)
    if by_column:
        cols, order = cols.sort(-1)
        values = values.gather(-1, order)
    return values, cols


def _torch_top_k(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k with torch.topk, in no particular order."""
    S = s.shape[-1]
    g = 8 if S >= 32 * k else 4 if S >= 16 * k else 1
    if g == 1 or k == 0:
        return s.topk(k, dim=-1, sorted=False)
    lead, G = s.shape[:-1], S // g
    body = s[..., : G * g].reshape(*lead, g, G)  # a view when s's rows are contiguous
    groups = body.amax(-2).topk(k, dim=-1, sorted=False).indices  # (..., k)
    cand = body.gather(-1, groups.unsqueeze(-2).expand(*lead, g, k)).view(*lead, g * k)  # column t·G + groups[j]
    if S > G * g:
        cand = torch.cat([cand, s[..., G * g:]], -1)
    values, pos = cand.topk(k, dim=-1, sorted=False)
    t, j = torch.div(pos, k, rounding_mode="floor"), pos % k
    cols = t * G + groups.gather(-1, j.clamp_max(k - 1))
    if S > G * g:  # a tail column (pos >= g·k) is column G·g + (pos - g·k)
        cols = torch.where(pos >= g * k, pos + (G * g - g * k), cols)
    return values, cols


def grouped_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, Hq, C, S), v (B, Hkv, S, Dv) -> (B, Hq, C, Dv)."""
    B, Hq, C, S = p.shape
    Hkv = v.shape[1]
    out = torch.matmul(p.reshape(B, Hkv, (Hq // Hkv) * C, S), v.to(p.dtype))
    return out.view(B, Hq, C, v.shape[-1])


def key_window(allowed: torch.Tensor, k: int) -> tuple[int, int, tuple[int, int] | None]:
    """The keys a chunk of queries must score, from its allowed pairs (..., C, S) bool, k <= S:
    (lo, hi, masked). Every allowed key lies in [lo, hi), which is widened to at least k keys (so a row
    still has k distinct candidates); ``masked`` = (a, b) is the part of [lo, hi) holding a pair that is
    not allowed (None: every pair in the window is allowed).

    Causal, query chunk 4..7 of 8 (N = S): lo = 0, hi = 8, masked = (5, 8)::

        key    0 1 2 3 4 5 6 7
        q 4    1 1 1 1 1 0 0 0
        q 5    1 1 1 1 1 1 0 0
        q 6    1 1 1 1 1 1 1 0
        q 7    1 1 1 1 1 1 1 1
    """
    S = allowed.shape[-1]
    rows = allowed.reshape(-1, S)
    some = rows.any(0).nonzero()
    lo, hi = (int(some[0]), int(some[-1]) + 1) if len(some) else (0, 0)
    if hi - lo < k:
        hi = min(S, lo + k)
        lo = hi - k
    part = (~rows[:, lo:hi].all(0)).nonzero()
    return lo, hi, (lo + int(part[0]), lo + int(part[-1]) + 1) if len(part) else None


class TopK(DynamicPattern):
    """Each query keeps its ``k`` highest-scoring keys (all of them when fewer are allowed).

    Args:
        k: keys per query (> 0).
        chunk_size: queries scored at once (default: 128 while their scores fit in 64 MB, and at least
            16 MB of scores; see CHUNK_ROWS).
    """

    def __init__(self, k: int, *, chunk_size: int | None = None, restrict: Pattern | None = None):
        self.k = check_int("k", k, minimum=1)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)
        self.restrict = restrict

    def with_restriction(self, pattern: Pattern) -> TopK:
        return TopK(self.k, chunk_size=self.chunk_size, restrict=pattern)

    def __repr__(self) -> str:
        base = f"TopK({self.k})"
        return base if self.restrict is None else f"{base} & ({self.restrict!r})"

    # --- selection ---------------------------------------------------------------------
    def _chunks(self, B: int, H: int, N: int, S: int):
        c = self.chunk_size or score_rows(B * H * S)
        return [(i, min(N, i + c)) for i in range(0, N, c)]

    def _select(self, q_c, k, q_idx, n_q, key_padding_mask, scale, buffer=None):
        """The top-k (values, indices, valid) of a query chunk among its allowed keys, each row in
        ascending key order (the CSR products want it).

        Only the keys in the chunk's window (see key_window) are scored (written into ``buffer`` if
        given, see grouped_scores), and the mask is applied only where it removes a pair: with a causal
        restriction a chunk scores the keys up to its last query and masks one diagonal block.
        """
        S = k.shape[2]
        kk = min(self.k, S)
        allowed = allowed_mask(self, q_c.shape[0], q_c.shape[1], n_q, S, q_idx, key_padding_mask, q_c.device)
        lo, hi, masked = (0, S, None) if allowed is None else key_window(allowed, kk)
        s = grouped_scores(q_c, k[:, :, lo:hi], scale, buffer)  # (B, H, C, hi - lo)
        if masked is not None:
            a, b = masked
            s[..., a - lo:b - lo].masked_fill_(~allowed[..., a:b], float("-inf"))
        values, idx = top_k(s, kk, by_column=True)
        if lo:
            idx += lo
        return values, idx, ~torch.isneginf(values)

    def kept(self, q, k, *, key_padding_mask=None, scale=None):
        B, H, N, D = q.shape
        S = k.shape[2]
        scale = check_scale(scale, D)
        out = torch.zeros(B, H, N, S, dtype=torch.bool, device=q.device)
        with torch.no_grad():
            for a, b in self._chunks(B, H, N, S):
                idx_q = torch.arange(a, b, device=q.device)
                _, idx, valid = self._select(q[:, :, a:b], k, idx_q, N, key_padding_mask, scale)
                out[:, :, a:b].scatter_(-1, idx, valid)
        return out

    # --- attention ---------------------------------------------------------------------
    def attend(self, q, k, v, *, key_padding_mask, scale, dropout_p):
        return _TopKFunction.apply(q, k, v, self, key_padding_mask, scale, dropout_p)


def _drop_scale(keep: torch.Tensor, p: float, like: torch.Tensor) -> torch.Tensor:
    """The factor dropout applies to each weight (like ``like``): 1 / (1 - p) where kept, else 0; all 0 when
    p = 1."""
    return keep / (1 - p) if p < 1 else torch.zeros_like(like)


def _score_buffer(B: int, H: int, S: int, chunks, dtype: torch.dtype, device) -> torch.Tensor:
    """One buffer for the scores of every chunk of a call (see grouped_scores)."""
    return torch.empty(B * H * max((b - a for a, b in chunks), default=0) * S, dtype=dtype, device=device)


def _scatter_rows(acc: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
    """acc (B, Hkv, S, E) += val (B, Hq, C, K, E) at rows idx (B, Hq, C, K).

    (scatter_add_ along the row dimension; index_add_ over flattened rows measured ~10x
    slower on CPU for these many repeated rows.)
    """
    B, Hkv, S, E = acc.shape
    flat = idx.reshape(B, Hkv, -1)
    acc.scatter_add_(2, flat.unsqueeze(-1).expand(-1, -1, -1, E), val.reshape(B, Hkv, -1, E))


class _TopKFunction(torch.autograd.Function):
    """Top-k attention with a sparse backward.

    Forward scores every pair once (chunk by chunk), keeps each row's top-k indices and
    softmax weights (O(N * k) saved), and mixes the k selected values. The backward needs
    only those k pairs per row: dV, dK, dQ and the weights' gradient, so it costs
    O(N * k * D) instead of recomputing the N x S scores.

    On CPU, in float32, the products over the selected pairs run on the native kernels
    (sparse_attention/native/mix.c): out = P V and dQ = dS K as weighted sums of gathered rows,
    dW = dO V^T at the pairs as gathered dot products, dV = P^T dO and dK = dS^T Q as scatter-adds.
    Without them (or in float64) the pairs form a CSR matrix P (rows: queries, columns: the flattened
    key rows) and every product is a sparse one (dW by sampled_addmm, the transposed products through
    the transposed matrix built once). Both run several times faster than gathering k rows per query
    into (rows, k, D) tensors, tens of MB per chunk, which other devices use.
    """

    @staticmethod
    def forward(ctx, q, k, v, mech, key_padding_mask, scale, dropout_p):
        B, H, N, _ = q.shape
        S, Dv = k.shape[2], v.shape[3]
        acc = torch.promote_types(q.dtype, torch.float32)
        kk = min(mech.k, S)
        sparse = _use_sparse(q.device)
        idx = torch.empty(B, H, N, kk, dtype=torch.long, device=q.device)
        w = torch.empty(B, H, N, kk, dtype=acc, device=q.device)
        out = None if sparse else torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
        v_acc = v.to(acc)  # once, not per chunk
        keep = None
        if dropout_p > 0:
            keep = torch.rand(B, H, N, kk, device=q.device) >= dropout_p
        chunks = mech._chunks(B, H, N, S)
        scores = _score_buffer(B, H, S, chunks, acc, q.device)
        for a, b in chunks:
            q_idx = torch.arange(a, b, device=q.device)
            values, i_c, _ = mech._select(q[:, :, a:b], k, q_idx, N, key_padding_mask, scale, scores)
            w_c = masked_softmax(values)  # 0 where not allowed (-inf); NaN propagates
            idx[:, :, a:b], w[:, :, a:b] = i_c, w_c
            if not sparse:
                if keep is not None:
                    w_c = w_c * _drop_scale(keep[:, :, a:b], dropout_p, w_c)
                vs = gather_rows(v_acc, i_c)[0]  # (B, H, C, kk, Dv)
                out[:, :, a:b] = torch.einsum("bhck,bhckd->bhcd", w_c, vs).to(q.dtype)
        if sparse:  # all rows at once: one CSR product (one per chunk made the forward 1.1x slower at N=4096)
            w_used = w if keep is None else w * _drop_scale(keep, dropout_p, w)
            v_rows = v_acc.reshape(-1, Dv)
            out = native.mix_rows(w_used, flat_rows(idx, v.shape[1], S), v_rows)  # see native/mix.c
            if out is None:
                out = _csr(idx, w_used, v.shape[1], S) @ v_rows
            out = out.view(B, H, N, Dv).to(q.dtype)
        ctx.save_for_backward(q, k, v, idx, w, keep)
        ctx.scale, ctx.dropout_p, ctx.chunks, ctx.sparse = scale, dropout_p, chunks, sparse
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, idx, w, keep = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the backward is asked for (create_graph=True)
            return _differentiable_backward(q, k, v, idx, w, keep, grad, ctx.scale, ctx.dropout_p) + (None,) * 4
        if ctx.sparse:
            grads = _native_backward(q, k, v, idx, w, keep, grad, ctx.scale, ctx.dropout_p)
            if grads is None:
                grads = _sparse_backward(q, k, v, idx, w, keep, grad, ctx.scale, ctx.dropout_p)
            return grads + (None,) * 4
        scale, p_drop = ctx.scale, ctx.dropout_p
        acc = w.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        k_acc, v_acc = k.to(acc), v.to(acc)  # once, not per chunk
        for a, b in ctx.chunks:
            i_c, w_c, g = idx[:, :, a:b], w[:, :, a:b], grad[:, :, a:b].to(acc)
            drop = 1.0
            if keep is not None:
                drop = _drop_scale(keep[:, :, a:b], p_drop, w_c)
            w_used = w_c * drop
            _scatter_rows(dv, i_c, w_used.unsqueeze(-1) * g.unsqueeze(-2))
            vs = gather_rows(v_acc, i_c)[0]
            dw = torch.einsum("bhcd,bhckd->bhck", g, vs) * drop
            ds = _softmax_grad(w_c, dw, scale)
            ks = gather_rows(k_acc, i_c)[0]
            dq[:, :, a:b] = torch.einsum("bhck,bhckd->bhcd", ds, ks)
            _scatter_rows(dk, i_c, ds.unsqueeze(-1) * q[:, :, a:b].to(acc).unsqueeze(-2))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _differentiable_backward(q, k, v, idx, w, keep, grad, scale, p_drop) -> tuple:
    """The gradients as a graph, for second order: the attention over the kept pairs recomputed with autograd
    from q, k, v (the saved weights w carry no graph: reusing them dropped their dependence on q and k, and
    second derivatives came out wrong). A pair the forward gave weight 0 (not allowed, or underflowed) stays
    out. Memory O(N·k·D): the gathered keys and values."""
    with torch.enable_grad():
        ks, vs = gather_rows(k, idx)[0], gather_rows(v, idx)[0]  # (B, H, N, kk, ·)
        s = torch.einsum("bhnd,bhnkd->bhnk", q, ks) * scale
        p = masked_softmax(s.to(w.dtype), w > 0)
        if keep is not None:
            p = p * _drop_scale(keep, p_drop, p)
        out = torch.einsum("bhnk,bhnkd->bhnd", p, vs.to(p.dtype)).to(q.dtype)
        wanted = [t for t in (q, k, v) if t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
        return tuple(next(found) if t.requires_grad else None for t in (q, k, v))


def _use_sparse(device: torch.device) -> bool:
    """The CSR products run on CPU (MKL); elsewhere the row gathers are used."""
    return device.type == "cpu" and SPARSE_PRODUCTS


def _csr(idx: torch.Tensor, vals: torch.Tensor, Hkv: int, S: int, cols: torch.Tensor | None = None) -> torch.Tensor:
    """idx (B, Hq, C, K) key indices, ascending per row, with vals (B, Hq, C, K) -> CSR (B·Hq·C, B·Hkv·S) whose
    columns are the flattened key rows (query head h reads key head h // (Hq // Hkv)). ``cols``: those
    columns if already computed (_columns)."""
    B, Hq, C, K = idx.shape
    cols = _columns(idx, Hkv, S) if cols is None else cols
    crow = torch.arange(0, B * Hq * C * K + 1, K, device=idx.device, dtype=cols.dtype)
    return _sparse_csr(crow, cols, vals.reshape(-1), (B * Hq * C, B * Hkv * S))


def _columns(idx: torch.Tensor, Hkv: int, S: int) -> torch.Tensor:
    """The flat key rows of idx as CSR column indices: int32 when they fit (half the memory of int64)."""
    cols = flat_rows(idx, Hkv, S)
    return cols.to(torch.int32) if idx.shape[0] * Hkv * S < 2**31 and idx.numel() < 2**31 else cols


def _sparse_csr(crow, cols, vals, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals, size=size, check_invariants=False)


def _softmax_grad(w: torch.Tensor, dw: torch.Tensor, scale: float) -> torch.Tensor:
    """The scores' gradient from the weights' w (..., k) and theirs dw: softmax backward (0 where w is 0),
    times the scale."""
    return w * (dw - (w * dw).sum(-1, keepdim=True)) * scale


def _native_backward(q, k, v, idx, w, keep, grad, scale, p_drop):
    """The products of _sparse_backward on the native kernels (sparse_attention/native/mix.c), for float32;
    None where they are not available. dW are dot products with gathered value rows, dQ weighted sums of
    gathered key rows, and dV, dK scatter-adds (in parallel over batch entries and key heads, which share
    no key row), so no CSR matrix is built."""
    if w.dtype != torch.float32 or torch.is_grad_enabled() or not native.available():
        return None  # (grad enabled: a double backward, which the kernels' plain results cannot carry)
    B, H, N, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    K = idx.shape[-1]
    drop = 1.0 if keep is None else _drop_scale(keep, p_drop, w)
    g = grad.to(w.dtype).reshape(-1, Dv)  # (B·H·N, Dv)
    rows = flat_rows(idx, Hkv, S).reshape(-1, K)  # each pair's key row among the B·Hkv·S
    dw = native.dot_rows(g, rows, v.to(w.dtype).reshape(-1, Dv))
    if dw is None:  # the kernels declined (the others take the same kind of inputs)
        return None
    ds = _softmax_grad(w, dw.view(w.shape) * drop, scale)
    dq = native.mix_rows(ds.reshape(-1, K), rows, k.to(w.dtype).reshape(-1, D))
    # a batch entry's key head and its query heads form a group: their pairs touch only its S key rows
    dv = native.scatter_groups((w * drop).reshape(-1, K), rows, g, B * Hkv, S)
    dk = native.scatter_groups(ds.reshape(-1, K), rows, q.to(w.dtype).reshape(-1, D), B * Hkv, S)
    return dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)


def _sparse_backward(q, k, v, idx, w, keep, grad, scale, p_drop):
    """The backward of _TopKFunction as sparse products over all N·k pairs at once (see its docstring)."""
    B, H, N, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    acc = w.dtype
    drop = 1.0
    if keep is not None:
        drop = _drop_scale(keep, p_drop, w)
    w_used = w * drop
    g = grad.to(acc).reshape(-1, Dv)  # (B·H·N, Dv)
    cols = _columns(idx, Hkv, S)
    P = _csr(idx, w_used, Hkv, S, cols)
    dw = torch.sparse.sampled_addmm(P, g, v.to(acc).reshape(-1, Dv).t(), beta=0.0).values().view(w.shape) * drop
    del P
    ds = _softmax_grad(w, dw, scale)
    del dw
    dq = _csr(idx, ds, Hkv, S, cols) @ k.to(acc).reshape(-1, D)
    # P^T: rows are the key rows, columns the query rows; one ordering serves dV and dK
    order = torch.argsort(cols, stable=True)
    crow = torch.zeros(B * Hkv * S + 1, dtype=cols.dtype, device=q.device)
    crow[1:] = torch.bincount(cols, minlength=B * Hkv * S).cumsum(0)
    q_rows = torch.div(order, idx.shape[-1], rounding_mode="floor").to(cols.dtype)  # the query row of each pair
    del cols

    def transposed(vals):
        return _sparse_csr(crow, q_rows, vals.reshape(-1)[order], (B * Hkv * S, B * H * N))

    dv = transposed(w_used) @ g
    dk = transposed(ds) @ q.to(acc).reshape(-1, D)
    return dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)
