"""Top-k attention: each query attends to exactly its k highest-scoring allowed keys.

(Gupta et al., 2021, "Memory-efficient Transformers via Top-k Attention",
arXiv:2106.06899.) Every score must be computed, so the cost is that of dense
attention; what top-k changes is which values are mixed. Scores are computed one query
chunk at a time and each chunk is recomputed in the backward (activation
checkpointing), so memory is O(chunk * S) at a time plus O(N * D) saved, never N x S.

Ties between equal scores are broken by ``torch.topk`` (deterministic for given
inputs); ``kept`` reports exactly the pairs ``attend`` used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .._checks import check_int
from ..patterns.base import Pattern
from .base import DynamicPattern, allowed_mask

# Score elements per chunk (B * H * C * S): 16 MB in float32, small enough for the C
# allocator to recycle (fresh large buffers are page-faulted in at a few GB/s).
CHUNK_ELEMENTS = 1 << 22


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hq, C, D), k (B, Hkv, S, D) -> float32 (or float64) scores (B, Hq, C, S); head h reads h // G.

    The G query heads of a group are stacked as rows of one matmul (no broadcast copies).
    """
    B, Hq, C, D = q.shape
    Hkv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = (q.to(acc) * scale).reshape(B, Hkv, (Hq // Hkv) * C, D)  # (B, Hkv, G*C, D)
    return torch.matmul(qs, k.to(acc).transpose(-1, -2)).view(B, Hq, C, -1)


def grouped_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, Hq, C, S), v (B, Hkv, S, Dv) -> (B, Hq, C, Dv)."""
    B, Hq, C, S = p.shape
    Hkv = v.shape[1]
    out = torch.matmul(p.reshape(B, Hkv, (Hq // Hkv) * C, S), v.to(p.dtype))
    return out.view(B, Hq, C, -1)


class TopK(DynamicPattern):
    """Each query keeps its ``k`` highest-scoring keys (all of them when fewer are allowed).

    Args:
        k: keys per query (> 0).
        chunk_size: queries scored at once (default: about 64 MB of scores).
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
        c = self.chunk_size or max(1, CHUNK_ELEMENTS // max(B * H * S, 1))
        return [(i, min(N, i + c)) for i in range(0, N, c)]

    def _select(self, q_c, k, q_idx, n_q, key_padding_mask, scale):
        """Scores of a query chunk, and the top-k (values, indices, valid) among allowed keys."""
        s = grouped_scores(q_c, k, scale)  # (B, H, C, S)
        allowed = allowed_mask(self, q_c.shape[0], q_c.shape[1], n_q, k.shape[2], q_idx, key_padding_mask,
                               q_c.device)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        values, idx = s.topk(min(self.k, s.shape[-1]), dim=-1)
        return s, values, idx, ~torch.isneginf(values)

    def kept(self, q, k, *, key_padding_mask=None, scale=None):
        B, H, N, D = q.shape
        S = k.shape[2]
        scale = D**-0.5 if scale is None else scale
        out = torch.zeros(B, H, N, S, dtype=torch.bool, device=q.device)
        with torch.no_grad():
            for a, b in self._chunks(B, H, N, S):
                idx_q = torch.arange(a, b, device=q.device)
                _, _, idx, valid = self._select(q[:, :, a:b], k, idx_q, N, key_padding_mask, scale)
                out[:, :, a:b].scatter_(-1, idx, valid)
        return out

    # --- attention ---------------------------------------------------------------------
    def attend(self, q, k, v, *, key_padding_mask, scale, dropout_p):
        B, H, N, _ = q.shape
        S = k.shape[2]
        outs = []
        for a, b in self._chunks(B, H, N, S):
            q_idx = torch.arange(a, b, device=q.device)

            def chunk(q_c, k_, v_, q_idx=q_idx):
                _, values, idx, valid = self._select(q_c, k_, q_idx, N, key_padding_mask, scale)
                top = values.amax(-1, keepdim=True)
                top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
                w = torch.exp(values - top)  # 0 where not valid; NaN propagates
                w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
                if dropout_p > 0:
                    w = F.dropout(w, dropout_p)
                p = torch.zeros(*values.shape[:-1], S, dtype=w.dtype, device=w.device).scatter(-1, idx, w)
                return grouped_values(p, v_).to(q_c.dtype)

            q_c = q[:, :, a:b]
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                outs.append(checkpoint(chunk, q_c, k, v, use_reentrant=False))
            else:
                outs.append(chunk(q_c, k, v))
        return torch.cat(outs, dim=2)
