"""ProbSparse attention with its projections: what ``MultiheadAttention(attention=ProbSparse(...))`` runs.

The function is the generic layer's, ``out_proj(ProbSparse(q, k, v))`` with ``q, k, v`` the input
projections; only u = ceil(c ln N) queries per head attend, and the work follows them:

* **Queries.** Every query is projected without a gradient, only to select the active ones; the
  u active rows of each head are projected again with a gradient, so the query projection's
  backward costs H·u rows instead of N.
* **Keys and values (non-causal).** The keys are needed at the sampled positions only (again no
  gradient), so only those are projected. The active queries' scores and outputs are taken
  against the *inputs*: with W_k,h and W_v,h the rows of head h's projections,

      s = (q_a W_k,h) key^T (+ q_a . b_k,h, the same for a whole row: no effect on the softmax)
      o_a = (P value) W_v,h^T + rowsum(P) b_v,h

  which is (H·u) x S x E work instead of projecting all S keys and values (S x E x E each),
  forward and backward, when H·u < E (here at 4096 tokens: 336 against 512).
* **Output (non-causal).** Every lazy row of a head outputs the same mean of V, so all lazy
  rows project to one row ``c = out_proj(means)``; an active (row, head) adds
  W_o,h (o_a - mean_h). The output projection costs H·u rows instead of N.

Causal ProbSparse gives each lazy row a running mean of V, which needs every value: there only
the query saving applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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

            p = softmax(t key^T) over the allowed keys (dropout applied), returns
        (p value, rowsum(p), w_mean value)

    t (B, M, kdim), key (B, S, kdim), value (B, S, vdim), w_mean (B, 1, S),
    allowed (B, 1, S) bool or None -> (B, M, vdim), (B, M, 1), (B, 1, vdim).

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
        ctx.save_for_backward(t, key, value, w_mean, p, drop)
        return torch.bmm(pd, value), pd.sum(-1, keepdim=True), torch.bmm(w_mean, value)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_pv, d_sum, d_mean):
        t, key, value, w_mean, p, drop = ctx.saved_tensors
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
    scale = D**-0.5
    # against the inputs when the active queries of all heads are fewer than the projected features
    in_input_space = not pattern.causal and H * pattern.num_active(N) < Hkv * D
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

    if in_input_space:
        oa, mean = _attend_inputs(qa * scale, key, value, (wk, bk), (wv, bv), Hkv, key_padding_mask, dropout_p)
    else:
        oa = pattern.attend_active(qa, active, k, v, N, key_padding_mask=key_padding_mask, scale=scale,
                                   dropout_p=dropout_p)
        if pattern.causal:  # a running mean per lazy row: the heads' outputs are projected as usual
            lazy = pattern.lazy_output(v, N, key_padding_mask, H)
            out = lazy.scatter(2, active.unsqueeze(-1).expand(-1, -1, -1, D), oa)  # (B, H, N, D)
            return out_proj(out.transpose(1, 2).reshape(B, N, E))
        mean = pattern.lazy_output(v, 1, key_padding_mask, H).squeeze(2)  # (B, H, D)
    c = out_proj(mean.reshape(B, 1, E))  # (B, 1, E): the output of every row that is lazy in every head
    delta = torch.einsum("bhud,ehd->bhue", oa - mean.unsqueeze(2), out_proj.weight.view(E, H, D))  # (B, H, u, E)
    rows = (active + N * torch.arange(B, device=active.device).view(B, 1, 1)).reshape(-1)
    return c.expand(B, N, E).contiguous().view(B * N, E).index_add_(0, rows, delta.reshape(-1, E)).view(B, N, E)


def _attend_inputs(qa: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_proj: Projection, v_proj: Projection,
                   Hkv: int, key_padding_mask: torch.Tensor | None, dropout_p: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The active queries' outputs and the lazy rows' means from the key and value inputs.

    qa (B, H, u, D), already scaled; key (B, S, kdim), value (B, S, vdim) -> (B, H, u, D), (B, H, D).
    """
    B, H, u, D = qa.shape
    S = key.shape[1]
    wk_h = _heads(k_proj[0], None, Hkv, H)[0]  # (H, D, kdim); the key bias adds q.b_k to a whole row: no effect
    wv_h, bv_h = _heads(*v_proj, Hkv, H)  # (H, D, vdim), (H, D)
    t = torch.einsum("bhud,hde->bhue", qa, wk_h).reshape(B, H * u, -1)  # (B, H·u, kdim): queries in input space
    if key_padding_mask is None:
        real = torch.full((B, 1), float(S), dtype=value.dtype, device=value.device)
        allowed = None
    else:
        real = (~key_padding_mask).sum(1, keepdim=True).to(value.dtype)  # (B, 1)
        allowed = ~key_padding_mask.unsqueeze(1)  # (B, 1, S)
    # the lazy rows' mean of V is the V of the mean of the real value rows
    w_mean = (torch.ones(B, S, dtype=value.dtype, device=value.device) if allowed is None else
              allowed.squeeze(1).to(value.dtype)) / real.clamp_min(1)
    pv, p_sum, x_mean = _InputSpaceAttention.apply(t, key, value, w_mean.unsqueeze(1), allowed, dropout_p)
    oa = torch.einsum("bhue,hde->bhud", pv.view(B, H, u, -1), wv_h)  # (B, H, u, D)
    mean = torch.einsum("be,hde->bhd", x_mean.squeeze(1), wv_h)  # (B, H, D)
    if bv_h is not None:
        oa = oa + p_sum.view(B, H, u, 1) * bv_h.unsqueeze(1)
        mean = mean + (real > 0).to(value.dtype).unsqueeze(-1) * bv_h  # no real key: the mean is 0
    return oa, mean
