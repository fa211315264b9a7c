"""ProbSparse attention with its projections: what ``MultiheadAttention(attention=ProbSparse(...))`` runs.

The function is the generic layer's, ``out_proj(ProbSparse(q, k, v))`` with ``q, k, v`` the input
projections; only u = ceil(c ln N) queries per head attend, and the work follows them:

* **Queries.** Every query is projected without a gradient, only to select the active ones; the
  u active rows of each head are projected again with a gradient, so the query projection's
  backward costs H·u rows instead of N.
* **Keys and values**, when H·u < Hkv·D (at N = 4096, H = 8, D = 64: 336 against 512). The keys are
  needed at the sampled positions only (again no gradient), so only those are projected. The active
  queries' scores and outputs are taken against the *inputs*: with W_k,h and W_v,h the rows of head h's
  projections,

      s = (q_a W_k,h) key^T (+ q_a . b_k,h, the same for a whole row: no effect on the softmax)
      o_a = (P value) W_v,h^T + rowsum(P) b_v,h

  which is (H·u) x S x E work instead of projecting all S keys and values (S x E x E each), forward
  and backward (``_InputSpaceAttention``, with its own backward).
* **Lazy rows.** A lazy row of head h outputs the (running) mean of V, which is the mean of the value
  inputs projected: x W_v,h^T + alpha b_v,h. Non-causal, that is one row for every lazy row, so the
  output projection maps one row ``c = out_proj(means)``; causal, the value and output projections
  fold into one (E, vdim) matrix applied to the running means of the inputs. Each active (row, head)
  then adds W_o,h (o_a - its lazy output). The output projection costs H·u rows (non-causal) or one
  product instead of two (causal).

Otherwise (H·u >= Hkv·D) the keys and values are projected as usual, with the query and (non-causal)
output savings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_scale
from ..approx._common import zero_padded
from ..dynamic.probsparse import ProbSparse
from ..reference import masked_softmax

Projection = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, in), bias (out,) or None)


def _heads(w: torch.Tensor, b: torch.Tensor | None, Hkv: int, H: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A (Hkv·D, E) projection as (H, D, E) per query head (head h reads key/value head h // (H // Hkv))."""
    G = H // Hkv
    w = w.view(Hkv, -1, w.shape[-1]).repeat_interleave(G, 0)
    return w, None if b is None else b.view(Hkv, -1).repeat_interleave(G, 0)


class _InputSpaceAttention(torch.autograd.Function):
    """Softmax attention of queries given in input space against the key and value *inputs*:

        p = softmax(t key^T) over the allowed keys (dropout applied)  ->  (p value, rowsum(p), w_mean value)

    t (B, M, kdim), key (B, S, kdim), value (B, S, vdim), w_mean (B, 1, S) or None (then the third
    output is None), allowed bool broadcastable to (B, M, S) or None -> (B, M, vdim), (B, M, 1), (B, 1, vdim).

    Its own backward, so the key and value gradients come out contiguous, and as one buffer
    (accumulated by the matrix products themselves) when key and value are the same tensor.
    """

    @staticmethod
    def forward(ctx, t, key, value, w_mean, allowed, dropout_p):
        s = torch.bmm(t, key.transpose(1, 2))  # (B, M, S)
        p = masked_softmax(s, allowed)
        drop = F.dropout(torch.ones_like(p), dropout_p) if dropout_p > 0 else None  # 0 or 1 / (1 - dropout_p)
        pd = p if drop is None else p * drop
        ctx.same_input = key is value
        ctx.save_for_backward(t, key, value, w_mean, p, drop, allowed)
        return torch.bmm(pd, value), pd.sum(-1, keepdim=True), None if w_mean is None else torch.bmm(w_mean, value)

    @staticmethod
    def backward(ctx, d_pv, d_sum, d_mean):
        t, key, value, w_mean, p, drop, allowed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: p again, from the inputs, so a second backward sees through it
            p = masked_softmax(torch.bmm(t, key.transpose(1, 2)), allowed)
        pd = p if drop is None else p * drop
        d_p = torch.baddbmm(d_sum, d_pv, value.transpose(1, 2))  # (B, M, S)
        if drop is not None:
            d_p *= drop
        d_s = p * (d_p - (p * d_p).sum(-1, keepdim=True))
        d_t = torch.bmm(d_s, key)
        d_key = torch.bmm(d_s.transpose(1, 2), t)  # (B, S, kdim)
        if ctx.same_input:  # one buffer: the value gradient is accumulated into the key's
            d_value = d_key.baddbmm_(pd.transpose(1, 2), d_pv)
        else:
            d_value = torch.bmm(pd.transpose(1, 2), d_pv)
        if w_mean is not None:
            d_value.baddbmm_(w_mean.transpose(1, 2), d_mean)
        return d_t, d_key, None if ctx.same_input else d_value, None, None, None


def probsparse_layer(pattern: ProbSparse, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     projections: tuple[Projection, Projection, Projection], out_proj: torch.nn.Linear, *,
                     num_heads: int, num_kv_heads: int, key_padding_mask: torch.Tensor | None,
                     dropout_p: float) -> torch.Tensor:
    """query (B, N, E), key (B, S, kdim), value (B, S, vdim) -> (B, N, E), N, S >= 1.

    ``projections``: ((wq, bq), (wk, bk), (wv, bv)) with wq (E, E), wk (Hkv·D, kdim), wv (Hkv·D, vdim);
    ``key_padding_mask``: (B, S) bool, True = padding. Float32 or float64.
    """
    (wq, bq), (wk, bk), (wv, bv) = projections
    B, N, E = query.shape
    S = key.shape[1]
    H, Hkv = num_heads, num_kv_heads
    D = E // H
    scale = check_scale(None, D)  # the default of sa.attention, to the bit (ties select alike)
    # against the inputs when the active queries of all heads are fewer than the projected features
    in_input_space = H * pattern.num_active(N) < Hkv * D
    with torch.no_grad():
        q_all = F.linear(query, wq, bq).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D), to select only
    if in_input_space:
        sample = pattern.key_sample(N, S, query.device)  # (blocks, s)
        with torch.no_grad():
            k_sampled = F.linear(key[:, sample], wk, bk)  # (B, blocks, s, Hkv·D)
        k_sampled = k_sampled.view(*k_sampled.shape[:3], Hkv, D).permute(0, 3, 1, 2, 4)  # (B, Hkv, blocks, s, D)
        active = pattern.active_from_sample(q_all, k_sampled, sample, S, key_padding_mask=key_padding_mask,
                                            scale=scale)  # (B, H, u)
    else:
        k = F.linear(key, wk, bk).view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
        v = F.linear(value, wv, bv).view(B, S, Hkv, D).transpose(1, 2)
        active = pattern.active_queries(q_all, k, key_padding_mask=key_padding_mask, scale=scale)
    u = active.shape[-1]
    x_active = query.gather(1, active.reshape(B, H * u, 1).expand(-1, -1, E)).view(B, H, u, E)
    qa = torch.einsum("bhue,hde->bhud", x_active, wq.view(H, D, E))  # (B, H, u, D), with a gradient
    if bq is not None:
        qa = qa + bq.view(H, 1, D)

    # every row's output as if it were lazy in every head (base, (B, N, E)), and each active (row, head)'s
    # lazy output (lazy_active, (B, H, u, D)), which its attention output replaces
    if not in_input_space:
        oa = pattern.attend_active(qa, active, k, v, N, key_padding_mask=key_padding_mask, scale=scale,
                                   dropout_p=dropout_p)
        if pattern.causal:  # a running mean per lazy row: the heads' outputs are projected as usual
            lazy = pattern.lazy_output(v, N, key_padding_mask, H)
            out = lazy.scatter(2, active.unsqueeze(-1).expand(-1, -1, -1, D), oa)  # (B, H, N, D)
            return out_proj(out.transpose(1, 2).reshape(B, N, E))
        lazy_active = pattern.lazy_output(v, 1, key_padding_mask, H)  # (B, H, 1, D): the mean of V
    else:
        wk_h = _heads(wk, None, Hkv, H)[0]  # (H, D, kdim); the key bias adds q.b_k to a whole row: no effect
        wv_h, bv_h = _heads(wv, bv, Hkv, H)  # (H, D, vdim), (H, D)
        allowed = pattern.allowed_keys(active + (S - N), S, key_padding_mask)  # (B|1, H|1, u|1, S) or None
        if allowed is not None:
            allowed = allowed.view(allowed.shape[0], 1, S) if allowed.shape[1:3] == (1, 1) else \
                allowed.expand(B, H, u, S).reshape(B, H * u, S)
        # the lazy rows read the (running) mean of the value inputs: the mean of V is its V
        lazy_x, alpha = _lazy_inputs(pattern, value, N, key_padding_mask)  # (B, 1|N, vdim), (B, 1|N)
        oa, x_mean = _attend_inputs(qa * scale, key, value, wk_h, wv_h, bv_h, allowed,
                                    None if pattern.causal else lazy_x, dropout_p)
        vdim = value.shape[-1]
        if pattern.causal:
            m = out_proj.weight @ wv_h.reshape(E, vdim)  # (E, vdim): the value and output projections in one
            base = F.linear(lazy_x, m, out_proj.bias)  # (B, N, E)
            if bv_h is not None:
                base = base + alpha.unsqueeze(-1) * (out_proj.weight @ bv_h.reshape(E))
            flat = active.reshape(B, H * u)
            x_rows = lazy_x.gather(1, flat.unsqueeze(-1).expand(-1, -1, vdim)).view(B, H, u, vdim)
            a_rows = alpha.gather(1, flat).view(B, H, u, 1)
        else:
            x_rows, a_rows = x_mean.view(B, 1, 1, vdim).expand(B, H, 1, vdim), alpha.view(B, 1, 1, 1)
        lazy_active = torch.einsum("bhue,hde->bhud", x_rows, wv_h)  # (B, H, u or 1, D)
        if bv_h is not None:
            lazy_active = lazy_active + a_rows * bv_h.unsqueeze(1)
    if not pattern.causal:  # one row: every lazy row of a head outputs the same mean
        base = out_proj(lazy_active.reshape(B, 1, E)).expand(B, N, E).contiguous()
    delta = torch.einsum("bhud,ehd->bhue", oa - lazy_active, out_proj.weight.view(E, H, D))  # (B, H, u, E)
    rows = (active + N * torch.arange(B, device=active.device).view(B, 1, 1)).reshape(-1)
    return base.view(B * N, E).index_add_(0, rows, delta.reshape(-1, E)).view(B, N, E)


def _lazy_inputs(pattern: ProbSparse, value: torch.Tensor, n_q: int, key_padding_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the lazy rows average, in input space: (x, alpha) such that a lazy row's output in head h is
    x W_v,h^T + alpha b_v,h.

    Non-causal: x (B, 1, S) holds the weights of the mean over the real keys (the mean itself is taken
    with the attention's products), alpha (B, 1) is 1, or 0 when there is no real key. Causal: x
    (B, n_q, vdim) is the running mean (or sum) of the real value rows up to each query's key position
    (bottom-right aligned; 0 before the first key), alpha (B, n_q) is 1 where some real key was seen
    (or the running count)."""
    B, S = value.shape[:2]
    keep = torch.ones(B, S, dtype=value.dtype, device=value.device) if key_padding_mask is None else \
        (~key_padding_mask).to(value.dtype)
    if not pattern.causal:
        real = keep.sum(1, keepdim=True)  # (B, 1)
        return (keep / real.clamp_min(1)).unsqueeze(1), (real > 0).to(value.dtype)
    run, count = zero_padded(value, key_padding_mask).cumsum(1), keep.cumsum(1)  # (B, S, vdim), (B, S)
    if n_q != S:
        pos = torch.arange(n_q, device=value.device) + (S - n_q)  # key-space positions
        valid = (pos >= 0).to(value.dtype)
        run, count = run[:, pos.clamp(min=0)] * valid.view(1, -1, 1), count[:, pos.clamp(min=0)] * valid
    if pattern.causal_lazy == "sum":
        return run, count
    return run / count.clamp_min(1).unsqueeze(-1), (count > 0).to(value.dtype)


def _attend_inputs(qa: torch.Tensor, key: torch.Tensor, value: torch.Tensor, wk_h: torch.Tensor, wv_h: torch.Tensor,
                   bv_h: torch.Tensor | None, allowed: torch.Tensor | None, w_mean: torch.Tensor | None,
                   dropout_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The active queries' outputs from the key and value inputs, and the w_mean-weighted mean of the
    value rows.

    qa (B, H, u, D), already scaled; key (B, S, kdim), value (B, S, vdim); wk_h, wv_h (H, D, kdim|vdim),
    bv_h (H, D); allowed broadcastable to (B, H·u, S); w_mean (B, 1, S) or None
    -> (B, H, u, D), (B, 1, vdim) or None.
    """
    B, H, u, D = qa.shape
    t = torch.einsum("bhud,hde->bhue", qa, wk_h).reshape(B, H * u, -1)  # (B, H·u, kdim): queries in input space
    pv, p_sum, x_mean = _InputSpaceAttention.apply(t, key, value, w_mean, allowed, dropout_p)
    oa = torch.einsum("bhue,hde->bhud", pv.view(B, H, u, -1), wv_h)  # (B, H, u, D)
    if bv_h is not None:
        oa = oa + p_sum.view(B, H, u, 1) * bv_h.unsqueeze(1)
    return oa, x_mean
