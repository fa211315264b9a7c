"""ProbSparse self-attention (Informer; Zhou et al., 2021, arXiv:2012.07436).

Only the "active" queries attend; the rest ("lazy") output a cheap summary of V.

1. Each query i scores a sample of ``ceil(factor * ln S)`` keys drawn uniformly (with
   replacement) from a generator seeded with ``seed``; its sparsity measurement is
   M(q_i) = max_j s_ij - mean_j s_ij over that sample (s = q.k * scale), padded keys left
   out. One sample is drawn per block of SAMPLE_BLOCK = 64 consecutive queries, shared by
   the block, the batch and the heads: each query's sample is still uniform, as the
   definition asks, and a block's scores are one small matmul instead of a gather of
   N x sample x D keys (the official code's per-query draw; HF shares one draw among all
   queries). With a key padding mask and N == S (self-attention), padded queries are
   never active.
2. The ``u = ceil(factor * ln N)`` queries with the largest M (per batch and head)
   attend to every allowed key (all keys; causal: keys at or before the query's
   position, bottom-right aligned; padded keys never).
3. Lazy queries output the mean of V over the non-padded keys (non-causal), or, when
   causal, the running mean of V over the keys up to their position. (The official
   Informer code uses the running *sum* for the causal case; the mean keeps the output
   on the scale of V. ``causal_lazy="sum"`` reproduces the code.)

With factor large enough that u >= N every query is active: plain softmax attention.
Cost: O(N ln S) for the measurement and O(u S) for the attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_bool, check_positive_real, check_scale, check_seed
from ..reference import masked_softmax
from .base import DynamicPattern, padded, query_heads
from .topk import grouped_scores, grouped_values

SAMPLE_BLOCK = 64  # consecutive queries sharing one key sample


class ProbSparse(DynamicPattern):
    """Informer's ProbSparse attention (see the module docstring).

    Args:
        factor: sampling factor c (> 0): u = ceil(c ln N) active queries, ceil(c ln S) sampled keys.
        seed: seed of the key sample.
        causal: lazy queries take the running mean of V; active queries see keys j <= i.
        causal_lazy: "mean" (default) or "sum" (the official code's running sum).
    """

    def __init__(self, factor: float = 5.0, *, seed: int = 0, causal: bool = False, causal_lazy: str = "mean"):
        self.factor = check_positive_real("factor", factor)
        self.seed = check_seed(seed)
        check_bool("causal", causal)
        self.causal = causal
        if causal_lazy not in ("mean", "sum"):
            raise ValueError(f"causal_lazy must be 'mean' or 'sum', got {causal_lazy!r}")
        self.causal_lazy = causal_lazy

    def __repr__(self) -> str:
        return f"ProbSparse(factor={self.factor}, seed={self.seed}, causal={self.causal})"

    def with_restriction(self, pattern):
        raise TypeError("ProbSparse selects queries, not pairs; combine it with causal=True instead of `&`")

    def num_active(self, n_q: int) -> int:
        return min(n_q, math.ceil(self.factor * math.log(max(n_q, 2))))

    def num_samples(self, n_k: int) -> int:
        return min(n_k, math.ceil(self.factor * math.log(max(n_k, 2))))

    def allowed_keys(self, pos: torch.Tensor, n_k: int, key_padding_mask) -> torch.Tensor | None:
        """Keys the active queries at key-space positions ``pos`` (B, H, u) may see: (B|1, H|1, u|1, S) bool."""
        m = None
        if self.causal:
            m = torch.arange(n_k, device=pos.device) <= pos.unsqueeze(-1)
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]
            m = keep if m is None else m & keep
        return m

    def key_sample(self, n_q: int, n_k: int, device=None) -> torch.Tensor:
        """(ceil(n_q / SAMPLE_BLOCK), num_samples(n_k)) key positions: row b is the sample of query block b."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(n_k, (-(-n_q // SAMPLE_BLOCK), self.num_samples(n_k)), generator=g).to(device)

    def active_queries(self, q, k, *, key_padding_mask=None, scale=None) -> torch.Tensor:
        """(B, H, u) indices of the active queries (the top-u of the sparsity measurement)."""
        sample = self.key_sample(q.shape[2], k.shape[2], q.device)
        with torch.no_grad():
            return self.active_from_sample(q, k[:, :, sample], sample, k.shape[2], key_padding_mask=key_padding_mask,
                                           scale=scale)

    def active_from_sample(self, q, ks, sample, n_k: int, *, key_padding_mask=None, scale=None) -> torch.Tensor:
        """``active_queries`` from the sampled keys alone: q (B, H, N, D), ks = k[:, :, sample]
        (B, Hkv, blocks, s, D) for ``sample = key_sample(N, n_k)``. No gradient."""
        B, H, N, D = q.shape
        Hkv, nb = ks.shape[1], sample.shape[0]
        scale = check_scale(scale, D)
        with torch.no_grad():
            acc = torch.promote_types(q.dtype, torch.float32)
            qp = padded(q.to(acc), (0, 0, 0, nb * SAMPLE_BLOCK - N))  # whole blocks (B, H, nb·64, D)
            qs = qp.view(B, Hkv, H // Hkv, nb, SAMPLE_BLOCK, D)
            s = torch.matmul(qs, ks.to(acc).unsqueeze(2).transpose(-1, -2))  # (B, Hkv, G, blocks, 64, s)
            s = s.view(B, H, nb * SAMPLE_BLOCK, s.shape[-1])[:, :, :N] * scale  # (B, H, N, s)
            if key_padding_mask is None:
                m = s.amax(-1) - s.mean(-1)  # (B, H, N)
            else:  # sampled padded keys do not count; padded queries (N == S) are never active
                real = ~key_padding_mask[:, sample].repeat_interleave(SAMPLE_BLOCK, 1)[:, None, :N]  # (B, 1, N, s)
                count = real.sum(-1)
                top = s.masked_fill(~real, float("-inf")).amax(-1)
                mean = (s * real).sum(-1) / count.clamp_min(1)
                m = torch.where(count > 0, top - mean, torch.full_like(top, float("-inf")))
                if N == n_k:
                    m = m.masked_fill(key_padding_mask.unsqueeze(1), float("-inf"))
        return m.topk(self.num_active(N), dim=-1).indices.sort(-1).values

    def kept(self, q, k, *, key_padding_mask=None, scale=None):
        B, H, N, _ = q.shape
        S = k.shape[2]
        active = self.active_queries(q, k, key_padding_mask=key_padding_mask, scale=scale)
        rows = torch.ones(B, H, active.shape[-1], S, dtype=torch.bool, device=q.device)
        allowed = self.allowed_keys(active + (S - N), S, key_padding_mask)
        if allowed is not None:
            rows = rows & allowed
        out = torch.zeros(B, H, N, S, dtype=torch.bool, device=q.device)
        out.scatter_(2, active.unsqueeze(-1).expand(-1, -1, -1, S), rows)
        return out

    def reference(self, q, k, v, *, key_padding_mask=None, scale=None, upcast: bool = True) -> torch.Tensor:
        """Active rows: dense attention over their kept keys; lazy rows: ``lazy_output``."""
        from ..reference import reference_attention

        kept = self.kept(q, k, key_padding_mask=key_padding_mask, scale=scale)
        active = kept.any(-1, keepdim=True)
        out = reference_attention(q, k, v, kept, scale=scale, upcast=upcast)
        lazy = self.lazy_output(v, q.shape[2], key_padding_mask, q.shape[1]).to(out.dtype)
        return torch.where(active, out, lazy)

    def lazy_output(self, v: torch.Tensor, n_q: int, key_padding_mask, H: int) -> torch.Tensor:
        """(B, H, N, Dv): the mean (or running mean/sum) of V that lazy queries output."""
        B, Hkv, S, Dv = v.shape
        w = torch.ones(B, 1, S, 1, dtype=v.dtype, device=v.device)
        if key_padding_mask is not None:
            w = (~key_padding_mask).to(v.dtype).view(B, 1, S, 1)
        vw = v if key_padding_mask is None else v * w  # (no copy of v, and none of its gradient, unmasked)
        if not self.causal:
            mean = vw.sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)
            out = mean.expand(B, Hkv, n_q, Dv)
        else:
            csum, count = vw.cumsum(2), w.cumsum(2)
            pos = torch.arange(n_q, device=v.device) + (S - n_q)  # key-space positions
            valid = pos >= 0
            pos = pos.clamp(min=0)
            run = csum[:, :, pos] if self.causal_lazy == "sum" else csum[:, :, pos] / count[:, :, pos].clamp_min(1)
            out = run * valid.view(1, 1, -1, 1).to(v.dtype)
        return query_heads(out, H)

    def attend_active(self, qa, active, k, v, n_q: int, *, key_padding_mask, scale, dropout_p) -> torch.Tensor:
        """The active queries' attention: qa (B, H, u, D), the queries at rows ``active`` (B, H, u) of
        the n_q queries; k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (B, H, u, Dv) in qa's dtype."""
        S = k.shape[2]
        s = grouped_scores(qa, k, scale)  # (B, H, u, S)
        p = masked_softmax(s, self.allowed_keys(active + (S - n_q), S, key_padding_mask))
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        return grouped_values(p, v).to(qa.dtype)

    def attend(self, q, k, v, *, key_padding_mask, scale, dropout_p):
        B, H, N, D = q.shape
        active = self.active_queries(q, k, key_padding_mask=key_padding_mask, scale=scale)  # (B, H, u)
        out = self.lazy_output(v, N, key_padding_mask, H).to(q.dtype)
        qa = q.gather(2, active.unsqueeze(-1).expand(-1, -1, -1, D))  # (B, H, u, D)
        oa = self.attend_active(qa, active, k, v, N, key_padding_mask=key_padding_mask, scale=scale,
                                dropout_p=dropout_p)
        return out.scatter(2, active.unsqueeze(-1).expand(-1, -1, -1, oa.shape[-1]), oa)
