"""Sparse Sinkhorn attention (Tay et al., 2020, arXiv:2002.11296): the functional core.

The sequence is cut into blocks of ``block`` tokens (the last one padded; padded keys
are never attended). A sorting network (``sa.nn.SinkhornAttention`` owns it) scores
block pairs; ``sinkhorn`` turns the scores into a doubly-stochastic matrix P (soft
sorting, differentiable) or, with ``hard=True``, into the one-hot of each row's argmax.
Keys and values are re-sorted block-wise with the same P (values are sorted values:
the sinkhorn-transformer 0.11.4 package sorts the *keys* into the values by mistake), and
each query block attends to the concatenation of its own block and its sorted block (a
slot of the sorted block is attended when more than half of its mass comes from real,
non-padded keys; padded keys and their values take no part in the mixtures, so what lies at padded
positions never changes the output):

    out_i = softmax([q_i K_i^T, q_i (sum_j P_ij K_j)^T] * scale) [V_i ; sum_j P_ij V_j]

``causal=True``: inside its own block a query sees keys at or before it, and a query
block may only receive blocks strictly before it: P is masked to j < i and normalised
over rows only (column normalisation would let later blocks' scores leak into earlier
rows); block 0 has no sorted block. With P the identity and causal=False every query
sees its own block twice with the same values, which leaves the softmax average
unchanged: block-local attention.

The attention itself is ``engine.blocksparse.items_attention`` (every query block an item against its
own block and its sorted block, 2·block keys: the native items kernels in float32, which read both parts in
place, else PyTorch's fused CPU kernel). Soft sorting is P's product with the blocks
(``engine.blocksparse.mixed_items_attention``: on the native kernels one autograd Function that adds the sorted
blocks' gradients into dk and dv in place and gives P's); a hard P that needs no gradient sorts by copies of
the chosen blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_int, check_positive_real, check_scale
from ..engine.blocksparse import items_attention, mixed_items_attention
from ..reference import zeros_from
from .base import padded


def _normalise(x: torch.Tensor, n_iters: int) -> list[torch.Tensor]:
    """The states after each half-step of ``n_iters`` Sinkhorn iterations in log space (rows, then columns;
    an empty row or column stays -inf)."""
    states = []
    for _ in range(n_iters):
        for dim in (-1, -2):
            x = x - torch.logsumexp(x, dim, keepdim=True).nan_to_num(neginf=0.0)
            states.append(x)
    return states


class _SinkhornIterations(torch.autograd.Function):
    """``n_iters`` log-space Sinkhorn iterations with their exact gradient, keeping only the input: the
    backward recomputes the states y of the half-steps and applies each one's gradient,
    dx = dy - exp(y) * sum(dy) along the normalised dimension (the softmax's), last to first. (Autograd
    would keep ~2 nb x nb tensors per half-step; PyTorch's checkpoint did this recomputation with autograd's
    bookkeeping and took ~1.6x the time at nb = 64.)"""

    @staticmethod
    def forward(ctx, x, n_iters):
        ctx.save_for_backward(x)
        ctx.n_iters = n_iters
        return _normalise(x, n_iters)[-1]

    @staticmethod
    def backward(ctx, g):  # plain differentiable ops: a graph of the backward, when asked for, is exact too
        (x,) = ctx.saved_tensors
        states = _normalise(x, ctx.n_iters)
        for y, dim in zip(reversed(states), [-2, -1] * ctx.n_iters, strict=True):
            g = g - torch.exp(y) * g.sum(dim, keepdim=True)
        return g, None


def sinkhorn(logits: torch.Tensor, n_iters: int = 8, *, temperature: float = 0.75, hard: bool = False,
             causal: bool = False) -> torch.Tensor:
    """(..., nb, nb) scores -> row/column-normalised matrix (log-space Sinkhorn iterations).

    ``hard``: the one-hot of each row's argmax of the normalised matrix (no gradient).
    ``causal``: entries with j >= i are removed and only rows are normalised (a row-wise
    softmax; row 0 holds no mass).
    """
    n_iters = check_int("n_iters", n_iters, minimum=0)
    temperature = check_positive_real("temperature", temperature)
    nb = logits.shape[-1]
    log_p = logits / temperature
    if causal:
        allowed = torch.ones(nb, nb, dtype=torch.bool, device=logits.device).tril(-1)
        log_p = log_p.masked_fill(~allowed, float("-inf"))
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True).nan_to_num(neginf=0.0)
        n_iters = 0
    if n_iters:
        log_p = _SinkhornIterations.apply(log_p, n_iters)
    p = torch.exp(log_p)
    if hard:
        p = F.one_hot(p.argmax(-1), nb).to(p.dtype) * (p.sum(-1, keepdim=True) > 0)
    return p


def _hard_sources(p: torch.Tensor) -> torch.Tensor | None:
    """For a permutation P (B, H, nb, nb) of zeros and ones with at most one 1 per row that autograd does not
    track (``sinkhorn(..., hard=True)``): the block each row takes (B, H, nb), -1 for a row of zeros; else
    None. Sorting by copies then gives exactly what P's product gives for finite keys (1·k, and 0), in a
    pass over the keys instead of an nb-fold product."""
    if p.requires_grad and torch.is_grad_enabled():
        return None
    if not bool(((p == 0) | (p == 1)).all() & (p.sum(-1) <= 1).all()):
        return None
    return torch.where(p.sum(-1) > 0, p.argmax(-1), -1)


def sinkhorn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, permutation: torch.Tensor, *,
                       block: int, causal: bool = False, scale: float | None = None,
                       key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Block-local attention plus attention to a re-sorted block.

    Args:
        q, k, v: (B, H, N, D), (B, H, N, D), (B, H, N, Dv); self-attention (S = N).
        permutation: (B, H, nb, nb) block-sorting matrix from ``sinkhorn`` (nb = ceil(N / block)).
        block: tokens per block.
        key_padding_mask: (B, N) bool, True = padding.
    Returns:
        (B, H, N, Dv).
    """
    block = check_int("block", block, minimum=1)
    B, H, N, D = q.shape
    if k.shape[:3] != (B, H, N) or v.shape[:3] != (B, H, N):
        raise ValueError(f"sinkhorn attention is self-attention: q, k, v must share (B, H, N), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    nb = math.ceil(N / block)
    if permutation.shape[-2:] != (nb, nb):
        raise ValueError(f"permutation must be (B, H, {nb}, {nb}) for N={N}, block={block}, got "
                         f"{tuple(permutation.shape)}")
    scale = check_scale(scale, D)
    if 0 in (B, H, N, v.shape[-1]):  # an empty output: no batch entry, head, token or value channel
        return zeros_from((B, H, N, v.shape[-1]), q, k, v, permutation)
    pad = nb * block - N
    acc = torch.promote_types(q.dtype, torch.float32)
    keep = torch.ones(B, N, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        keep = ~key_padding_mask
    keep = F.pad(keep, (0, pad), value=False).view(B, 1, nb, block)

    def blocks(x):  # (B, H, N, E) -> (B, H, nb, block, E)
        return padded(x.to(acc), (0, 0, 0, pad)).view(B, H, nb, block, x.shape[-1])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    if key_padding_mask is not None:  # padded keys and values take no part in the sorted blocks (nor their NaN)
        kb, vb = (torch.where(keep.view(B, 1, nb, block, 1), x, 0.0) for x in (kb, vb))
    p = permutation.to(acc)
    keep_sorted = torch.einsum("bhij,bjt->bhit", p, keep[:, 0].to(acc)) > 0.5  # sorted slot holds real keys
    # a row of P with no mass (causal block 0) contributes no sorted block
    far_ok = keep_sorted & (p.sum(-1) > 0).view(B, H, nb, 1)  # (B, H, nb, block)
    local_ok = keep.expand(B, H, nb, block)
    allowed = torch.cat([local_ok, far_ok], -1).unsqueeze(-2)  # (B, H, nb, 1, 2·block): per key slot
    if causal:  # inside its own block a query sees keys at or before it
        tri = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
        allowed = torch.cat([allowed[..., :block] & tri, allowed[..., block:].expand(B, H, nb, block, block)], -1)
    # each query block against [its own block ; its sorted block] (native items kernels or fused kernel on CPU)
    source = _hard_sources(p)
    if source is None:  # soft sorting: every sorted block a mixture of all blocks, P·K and P·V
        out = mixed_items_attention(qb, kb, vb, p, allowed, scale=scale)
    else:  # a hard permutation: each sorted block a copy of one block, or zeros where P's row is 0
        rows = (source.clamp(min=0) + torch.arange(B * H, device=q.device).view(B, H, 1) * nb).view(-1)
        k_sorted, v_sorted = (x.reshape(B * H * nb, block * x.shape[-1]).index_select(0, rows).view(x.shape)
                              for x in (kb, vb))
        if bool((source < 0).any()):
            k_sorted, v_sorted = (x.masked_fill((source < 0).view(B, H, nb, 1, 1), 0.0) for x in (k_sorted, v_sorted))
        out = items_attention(qb, kb, vb, allowed, scale=scale, k2=k_sorted, v2=v_sorted)
    return out.reshape(B, H, nb * block, v.shape[-1])[:, :, :N].to(q.dtype)


def sinkhorn_reference(q, k, v, permutation, *, block: int, causal: bool = False, scale=None,
                       key_padding_mask=None) -> torch.Tensor:
    """Readable loop over query blocks (for tests): the same definition as ``sinkhorn_attention``."""
    B, H, N, D = q.shape
    nb = math.ceil(N / block)
    scale = check_scale(scale, D)
    keep = torch.ones(B, N, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    q, k, v, p = q.double(), k.double(), v.double(), permutation.double()
    for b in range(B):
        for h in range(H):
            for i in range(nb):
                rows = range(i * block, min(N, (i + 1) * block))
                own = list(range(i * block, min(N, (i + 1) * block)))
                # the sorted block: slot t mixes position j*block + t of every block j with weight P[i, j]
                ks = torch.zeros(block, D, dtype=torch.float64)
                vs = torch.zeros(block, v.shape[-1], dtype=torch.float64)
                real = torch.zeros(block, dtype=torch.float64)
                for j in range(nb):
                    for t in range(block):
                        pos = j * block + t
                        if pos < N and keep[b, pos]:  # a padded key (and its value) takes no part
                            ks[t] += p[b, h, i, j] * k[b, h, pos]
                            vs[t] += p[b, h, i, j] * v[b, h, pos]
                            real[t] += p[b, h, i, j]
                has_far = bool(p[b, h, i].sum() > 0)
                for r in rows:
                    scores, values = [], []
                    for c in own:
                        if keep[b, c] and (not causal or c <= r):
                            scores.append(q[b, h, r] @ k[b, h, c] * scale)
                            values.append(v[b, h, c])
                    for t in range(block):
                        if has_far and real[t] > 0.5:
                            scores.append(q[b, h, r] @ ks[t] * scale)
                            values.append(vs[t])
                    if scores:
                        w = torch.softmax(torch.stack(scores), 0)
                        out[b, h, r] = (w.unsqueeze(-1) * torch.stack(values)).sum(0)
    return out
