"""Block-sparse engine: run a plan of batched fused-kernel calls, forward and backward.

Every segment of the plan (see ``plan.py``) is a batch of items, each one query block
against the concatenation of the key blocks it visits, with an element mask only
where some visited pair is not allowed. On CPU each batch is one call of PyTorch's
fused flash-attention kernel, which also returns the log-sum-exp (LSE) of each row.
The backward calls the kernel's backward on the same batches with the saved output
and LSE, so nothing of size N x S is ever built.

Memory: K/V of a segment whose key blocks form a sliding run are read through a
strided view (no copy), other K/V are gathered; work proceeds in chunks of query
blocks of about ``ROW_CHUNK_BYTES``, so peak memory is O(N * keys per query), never
O(N * S). Chunks also keep temporaries small enough for the C allocator to recycle:
fresh large buffers are page-faulted in at a few GB/s, which costs more than the
extra kernel calls.

On other devices, with dropout, or with non-finite inputs (the fused CPU kernel turns
a NaN query row into zeros, pytorch#141128), the same plan runs with plain
differentiable ops (``math_segments``).

Tensor layout inside the engine (G = Hq // Hkv query heads per key/value head):
    qf: (B*Hkv, QB, G*b, D)  query blocks, the G heads of a group stacked per block
    kf: (B*Hkv, KB*b, D)     keys padded to whole blocks
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F

from .. import native
from .._checks import first_order
from ..reference import masked_softmax
from .plan import Plan, Segment

# Working set of one chunk of query blocks (see the module docstring).
ROW_CHUNK_BYTES = 24 << 20

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def kernel_grad_rows(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a gradient from the kernel's backward, x (B, H, L, E), as a (B·H·L, E) matrix, with idx
    (B·H·L,) (one entry per row, in x's logical (B, H, L) order) permuted alike.

    The kernel stores its gradients as (B, L, H, E) (its head dimension innermost); reshaping them to rows
    in logical order copies the whole tensor. Rows in storage order, with the indices reordered, do not.
    """
    B, H, L, E = x.shape
    if _heads_inner(x):
        return x.transpose(1, 2).reshape(-1, E), idx.view(B, H, L).transpose(1, 2).reshape(-1)
    return x.reshape(-1, E), idx


def kernel_grad_select(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x.reshape(-1, E).index_select(0, pos) for a gradient x (B, H, L, E) from the kernel's backward
    (pos: row indices in logical (B, H, L) order), without first copying x into logical order."""
    B, H, L, E = x.shape
    if not _heads_inner(x):
        return x.reshape(-1, E).index_select(0, pos)
    b, h, l = torch.div(pos, H * L, rounding_mode="floor"), torch.div(pos, L, rounding_mode="floor") % H, pos % L
    return x.transpose(1, 2).reshape(-1, E).index_select(0, (b * L + l) * H + h)


def kernel_grad_out(rows: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """rows.index_select(0, idx).view(shape) (shape (B, H, L, E), idx in its logical order), stored as
    (B, L, H, E): the layout the kernel's backward wants for its output gradient. Given any other it copies
    the gradient first (at B=8, H=64, L=E=64: 19.5 against 14.3 ms per backward, page faults included);
    selecting the rows in that order costs nothing extra."""
    B, H, L, E = shape
    order = idx.view(B, H, L).transpose(1, 2).reshape(-1)
    return rows.index_select(0, order).view(B, L, H, E).transpose(1, 2)


def _heads_inner(x: torch.Tensor) -> bool:
    """Whether x (B, H, L, E) is stored as (B, L, H, E) (as the kernel's backward returns it), with H > 1."""
    return x.shape[1] > 1 and x.transpose(1, 2).is_contiguous()


# --- layout helpers ---------------------------------------------------------------------


def fold_queries(x: torch.Tensor, Hkv: int, b: int, QB: int) -> torch.Tensor:
    """(B, Hq, N, E) -> (B*Hkv, QB, G*b, E), zero-padded to QB*b rows."""
    B, Hq, N, E = x.shape
    G = Hq // Hkv
    if QB * b != N:
        x = F.pad(x, (0, 0, 0, QB * b - N))
    x = x.reshape(B, Hkv, G, QB, b, E)
    if G > 1:
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, Hkv, QB, G, b, E)
    return x.reshape(B * Hkv, QB, G * b, E)


def unfold_queries(x: torch.Tensor, B: int, Hq: int, N: int) -> torch.Tensor:
    """Inverse of fold_queries: (B*Hkv, QB, G*b, E) -> (B, Hq, N, E)."""
    BH, QB, Gb, E = x.shape
    Hkv = BH // B
    G = Hq // Hkv
    b = Gb // G
    x = x.view(B, Hkv, QB, G, b, E)
    if G > 1:
        x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hq, QB * b, E)[:, :, :N]


def fold_keys(x: torch.Tensor, b: int, KB: int) -> torch.Tensor:
    """(B, Hkv, S, E) -> (B*Hkv, KB*b, E) contiguous, zero-padded to whole blocks."""
    B, H, S, E = x.shape
    if KB * b != S:
        x = F.pad(x, (0, 0, 0, KB * b - S))
    return x.reshape(B * H, KB * b, E).contiguous()


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


class _Chunk:
    """Items lo..hi-1 of a segment: query blocks rows[i] against key blocks kv[i]."""

    def __init__(self, seg: Segment, lo: int, hi: int):
        self.seg = seg
        self.lo, self.hi = lo, hi
        self.rows = seg.rows[lo:hi]
        # a fused segment's items share their key blocks: the chunk is one tall item
        self.kv = seg.kv[lo : lo + 1] if seg.fused else seg.kv[lo:hi]

    def to_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row tensor (BH, R, G*b[, E]) -> the kernel's items (one tall item when fused)."""
        return x.reshape(x.shape[0], 1, -1, *x.shape[3:]) if self.seg.fused else x

    def from_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of to_kernel."""
        R = self.hi - self.lo
        return x.reshape(x.shape[0], R, -1, *x.shape[3:]) if self.seg.fused else x

    def _row_slice(self) -> slice | None:
        if self.seg.row_start is None:
            return None
        s = self.seg.row_start + self.lo
        return slice(s, s + self.hi - self.lo)

    def take_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (BH, QB, ...) -> (BH, R, ...) for this chunk's query blocks."""
        s = self._row_slice()
        return x[:, s] if s is not None else x.index_select(1, self.rows)

    def put_rows(self, x: torch.Tensor, val: torch.Tensor) -> None:
        """x[:, rows] = val."""
        s = self._row_slice()
        if s is not None:
            x[:, s] = val
        else:
            x.index_copy_(1, self.rows, val.to(x.dtype))

    def add_rows(self, x: torch.Tensor, val: torch.Tensor) -> None:
        """x[:, rows] += val."""
        s = self._row_slice()
        if s is not None:
            x[:, s] += val
        else:
            x.index_add_(1, self.rows, val.to(x.dtype))

    def take_keys(self, kf: torch.Tensor, b: int) -> torch.Tensor:
        """kf (BH, KB*b, E) -> (BH, R, K*b, E): a strided view for runs, else a gather."""
        BH, _, E = kf.shape
        R, K = self.kv.shape
        if self.seg.kv_run is not None:
            start, step = self.seg.kv_run
            start += self.lo * step
            return kf.as_strided(
                (BH, R, K * b, E), (kf.stride(0), step * b * E, E, 1), kf.storage_offset() + start * b * E
            )
        return kf.view(BH, -1, b, E).index_select(1, self.kv.flatten()).view(BH, R, K * b, E)

    def add_keys(self, acc: torch.Tensor, x: torch.Tensor, b: int) -> None:
        """acc (BH, KB, b, E) += the per-key gradients x (BH, R, K*b, E)."""
        BH, R, _, E = x.shape
        K = self.kv.shape[1]
        x = x.view(BH, R, K, b, E)
        if self.seg.kv_run is not None:
            start, step = self.seg.kv_run
            start += self.lo * step
            if step == 0:
                acc[:, start : start + K] += x.sum(1)
                return
            for t in range(K):  # item r holds key block start + r*step + t
                acc[:, start + t : start + t + (R - 1) * step + 1 : step] += x[:, :, t]
            return
        acc.index_add_(1, self.kv.flatten(), x.reshape(BH, R * K, b, E).to(acc.dtype))

    def mask(self, G: int, kpm_f: torch.Tensor | None, b: int) -> torch.Tensor | None:
        """Bool mask of this call in the kernel's item form (True = attend), or None.

        (1 or BH, R or 1, G*b, K*b); a fused chunk has one item of R*G*b rows.
        """
        L = self.kv.shape[1] * b
        m = self.seg.item_mask(self.lo, self.hi)  # (R or 1, b, L)
        if m is None and kpm_f is None:
            return None
        if m is None:
            m = torch.ones(1, b, L, dtype=torch.bool, device=self.kv.device)
        if G > 1:
            m = m.unsqueeze(1).expand(m.shape[0], G, b, L).reshape(m.shape[0], G * b, L)
        if self.seg.fused:  # the rows of every item stacked into one
            m = m.expand(self.hi - self.lo, G * b, L).reshape(1, -1, L)
        m = m.unsqueeze(0)
        if kpm_f is not None:
            keep = self.take_keys(kpm_f.unsqueeze(-1), b).squeeze(-1)  # (BH, items, L), True = real key
            m = m & keep.unsqueeze(2)
        return m


def _dirty_blocks(kpm_f: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """(KB,) bool: key blocks holding a padded key in any batch element."""
    if kpm_f is None:
        return None
    return (~kpm_f).view(kpm_f.shape[0], -1, b).any(-1).any(0)


def _padding_for(ch: _Chunk, kpm_f: torch.Tensor | None, dirty: torch.Tensor | None) -> torch.Tensor | None:
    """The key padding mask if this chunk visits a key block holding padding, else None."""
    return kpm_f if dirty is not None and bool(dirty[ch.kv].any()) else None


def _chunk_rows(segments, BH: int, QB: int, b: int, G: int, E: int, itemsize: int) -> tuple[int, float]:
    """Query block rows per chunk (about ROW_CHUNK_BYTES of work, at least one row) and the work bytes of one row,
    averaged over the segments' items."""
    per_row = 0.0
    for seg in segments:
        L = seg.num_kv_blocks * b
        # q, out and their gradients; K/V or their gradient buffers; an additive mask
        per_item = BH * (2 * G * b + L) * 2 * E * itemsize + (G * b * L * (itemsize + 1) if seg.needs_mask else 0)
        per_row += per_item * seg.num_items / max(QB, 1)
    return max(1, min(QB, int(ROW_CHUNK_BYTES // max(per_row, 1.0)))), per_row


def chunk_bytes(segments, BH: int, QB: int, b: int, G: int, E: int, itemsize: int) -> int:
    """The work bytes of the largest chunk ``_row_chunks`` makes of these segments (for cost estimates)."""
    step, per_row = _chunk_rows(segments, BH, QB, b, G, E, itemsize)
    return int(per_row * min(step, QB))


def _row_chunks(segments, BH: int, QB: int, b: int, G: int, E: int, itemsize: int):
    """Yield the chunks of every segment, about ROW_CHUNK_BYTES of work each."""
    step, _ = _chunk_rows(segments, BH, QB, b, G, E, itemsize)
    for r0 in range(0, QB, step):
        for seg in segments:
            lo, hi = bisect.bisect_left(seg.row_list, r0), bisect.bisect_left(seg.row_list, r0 + step)
            if hi > lo:
                yield _Chunk(seg, lo, hi)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> the kernel's additive mask (0 / -inf), in one pass."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.full((), float("-inf"), dtype=dtype, device=mask.device))


def _merge_rows(ch: _Chunk, out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:
    """Merge a partial result into rows that other segments may have written (exact, via the LSE)."""
    old = ch.take_rows(lse)
    new = torch.logaddexp(old, l)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    merged = ch.take_rows(out) * torch.exp(old - safe).unsqueeze(-1) + o * torch.exp(l - safe).unsqueeze(-1)
    ch.put_rows(out, merged)
    ch.put_rows(lse, new)


def forward_segments(segments, qf, kf, vf, G, b, scale, kpm_f):
    """out (BH, QB, G*b, Dv) and lse (BH, QB, G*b), both in the accumulation dtype."""
    BH, QB, Gb, D = qf.shape
    Dv = vf.shape[-1]
    out = torch.zeros(BH, QB, Gb, Dv, dtype=_acc(qf), device=qf.device)
    lse = torch.full((BH, QB, Gb), float("-inf"), dtype=_acc(qf), device=qf.device)
    dirty = _dirty_blocks(kpm_f, b)
    for ch in _row_chunks(segments, BH, QB, b, G, max(D, Dv), qf.element_size()):
        mask = ch.mask(G, _padding_for(ch, kpm_f, dirty), b)
        add = None if mask is None else _additive(mask, qf.dtype)
        o, l = _fwd(ch.to_kernel(ch.take_rows(qf)), ch.take_keys(kf, b), ch.take_keys(vf, b), 0.0, False,
                    attn_mask=add, scale=scale)
        if mask is not None:  # the kernel reports lse=0 for a row with no allowed key
            l = torch.where(mask.any(-1), l, torch.full_like(l, float("-inf")))
        o, l = ch.from_kernel(o), ch.from_kernel(l)
        if ch.seg.fused:  # its rows also belong to other segments
            _merge_rows(ch, out, lse, o, l.to(lse.dtype))
        else:
            ch.put_rows(out, o)
            ch.put_rows(lse, l)
    return out, lse


def backward_segments(segments, qf, kf, vf, G, b, scale, kpm_f, out, lse, dout):
    """Gradients in the accumulation dtype: dq (BH, QB, G*b, D), dk (BH, KB, b, D), dv (BH, KB, b, Dv)."""
    BH, QB, Gb, D = qf.shape
    Dv = vf.shape[-1]
    KB = kf.shape[1] // b
    dq = torch.zeros(BH, QB, Gb, D, dtype=_acc(qf), device=qf.device)
    dk = torch.zeros(BH, KB, b, D, dtype=_acc(qf), device=qf.device)
    dv = torch.zeros(BH, KB, b, Dv, dtype=_acc(qf), device=qf.device)
    # a row with no allowed key has lse=-inf; +inf makes every exp(score - lse) exactly 0
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    dirty = _dirty_blocks(kpm_f, b)
    for ch in _row_chunks(segments, BH, QB, b, G, max(D, Dv), qf.element_size()):
        mask = ch.mask(G, _padding_for(ch, kpm_f, dirty), b)
        add = None if mask is None else _additive(mask, qf.dtype)
        rows = [ch.to_kernel(ch.take_rows(x)) for x in (dout, qf, out, lse)]
        gq, gk, gv = _bwd(rows[0], rows[1], ch.take_keys(kf, b), ch.take_keys(vf, b), rows[2], rows[3], 0.0,
                          False, attn_mask=add, scale=scale)
        ch.add_rows(dq, ch.from_kernel(gq))
        ch.add_keys(dk, gk, b)
        ch.add_keys(dv, gv, b)
    return dq, dk, dv


def math_segments(segments, qf, kf, vf, G, b, scale, kpm_f, dropout_p):
    """The same plan with plain differentiable ops (dropout, non-finite inputs, non-CPU devices).

    Returns out (BH, QB, G*b, Dv) in the accumulation dtype (half inputs are upcast).
    """
    BH, QB, Gb, D = qf.shape
    Dv = vf.shape[-1]
    upcast = qf.dtype in (torch.float16, torch.bfloat16)
    dirty = _dirty_blocks(kpm_f, b)
    parts = []
    top = torch.full((BH, QB, Gb), float("-inf"), dtype=_acc(qf), device=qf.device)
    for ch in _row_chunks(segments, BH, QB, b, G, max(D, Dv), qf.element_size()):
        q, k, v = ch.to_kernel(ch.take_rows(qf)), ch.take_keys(kf, b), ch.take_keys(vf, b)
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (BH, items, rows per item, L)
        mask = ch.mask(G, _padding_for(ch, kpm_f, dirty), b)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        # a row may take keys from several segments: the largest of their maxima (rows are distinct
        # within a chunk); any shift gives the same softmax, so it takes no gradient
        part = ch.from_kernel(s.detach().amax(-1)).to(top.dtype)
        top = top.index_copy(1, ch.rows, torch.maximum(top.index_select(1, ch.rows), part))
        parts.append((ch, s, v))
    safe = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    out = torch.zeros(BH, QB, Gb, Dv, dtype=_acc(qf), device=qf.device)
    den = torch.zeros(BH, QB, Gb, dtype=_acc(qf), device=qf.device)
    for ch, s, v in parts:
        p = torch.exp(s - ch.to_kernel(ch.take_rows(safe)).unsqueeze(-1).to(s.dtype))  # 0 where masked
        den = den.index_add(1, ch.rows, ch.from_kernel(p.sum(-1)).to(den.dtype))
        if dropout_p > 0:  # on the normalised weights: dividing by the undropped sum afterwards is the same
            p = F.dropout(p, dropout_p)
        out = out.index_add(1, ch.rows, ch.from_kernel(torch.matmul(p, v)).to(out.dtype))
    # divided by the sum itself (exp(s - lse) loses the normalisation once lse rounds, at scores ~1e8);
    # a row with no key: 0 / tiny = 0
    return out / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)


class _BlockSparseFunction(torch.autograd.Function):
    """Forward and backward of one shared layout, straight on the fused CPU kernel."""

    @staticmethod
    def forward(ctx, q, k, v, segments, G, b, scale, kpm_f, QB, KB):
        qf = fold_queries(q, k.shape[1], b, QB)
        kf, vf = fold_keys(k, b, KB), fold_keys(v, b, KB)
        out, lse = forward_segments(segments, qf, kf, vf, G, b, scale, kpm_f)
        out = out.to(q.dtype)
        # the folded tensors are kept (not q, k, v) so the backward does not fold again
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.args = (segments, G, b, scale, kpm_f, q.shape, k.shape)
        return unfold_queries(out, q.shape[0], q.shape[1], q.shape[2])

    @staticmethod
    @first_order  # the fused kernel's backward has no derivative
    def backward(ctx, grad):
        qf, kf, vf, out, lse = ctx.saved_tensors
        segments, G, b, scale, kpm_f, q_shape, k_shape = ctx.args
        B, Hq, N, _ = q_shape
        _, Hkv, S, _ = k_shape
        QB, KB = qf.shape[1], kf.shape[1] // b
        gf = fold_queries(grad.to(qf.dtype), Hkv, b, QB).contiguous()
        dq, dk, dv = backward_segments(segments, qf, kf, vf, G, b, scale, kpm_f, out, lse, gf)
        dq = unfold_queries(dq, B, Hq, N).to(qf.dtype)
        dk = dk.view(B, Hkv, KB * b, -1)[:, :, :S].to(kf.dtype)
        dv = dv.view(B, Hkv, KB * b, -1)[:, :, :S].to(vf.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None


def _run_shared(segments, q, k, v, b, scale, key_padding_mask, dropout_p, exact_kernel):
    """Attention for heads sharing one layout. q (B, Hq, N, D) -> (B, Hq, N, Dv)."""
    B, Hq, N, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    QB, KB = -(-N // b), -(-S // b)
    kpm_f = None
    if key_padding_mask is not None:
        keep = F.pad(~key_padding_mask, (0, KB * b - S))  # (B, KB*b), padding past S is never read
        kpm_f = keep.unsqueeze(1).expand(B, Hkv, KB * b).reshape(B * Hkv, KB * b)
    if exact_kernel:
        if D != Dv:  # the fused kernel wants one head size: zero columns change no score or output
            E = max(D, Dv)
            q, k, v = F.pad(q, (0, E - D)), F.pad(k, (0, E - D)), F.pad(v, (0, E - Dv))
        out = _BlockSparseFunction.apply(q, k, v, segments, G, b, scale, kpm_f, QB, KB)
        return out[..., :Dv] if D != Dv else out
    qf = fold_queries(q, Hkv, b, QB)
    kf, vf = fold_keys(k, b, KB), fold_keys(v, b, KB)
    out = math_segments(segments, qf, kf, vf, G, b, scale, kpm_f, dropout_p)
    return unfold_queries(out, B, Hq, N).to(q.dtype)


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when no element is NaN or inf. A sum is non-finite when any element is (one fast read), but it
    also overflows for finite inputs (fp16 values of ~1000 over a few thousand elements): a non-finite sum
    is checked again by the smallest and largest element (NaN propagates into both), which cannot overflow."""
    for t in tensors:
        if not bool(torch.isfinite(t.sum())):
            lo, hi = torch.aminmax(t)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                return False
    return True


def blocksparse_attention(q, k, v, plan: Plan, *, scale: float, key_padding_mask=None, dropout_p=0.0):
    """Execute ``plan`` on validated inputs q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv)."""
    b = plan.block
    exact_kernel = q.device.type == "cpu" and dropout_p == 0.0 and all_finite(q, k, v)
    if len(plan.heads) == 1:
        return _run_shared(plan.heads[0], q, k, v, b, scale, key_padding_mask, dropout_p, exact_kernel)
    G = q.shape[1] // k.shape[1]
    outs = [
        _run_shared(segs, q[:, h : h + 1], k[:, h // G : h // G + 1], v[:, h // G : h // G + 1], b, scale,
                    key_padding_mask, dropout_p, exact_kernel)
        for h, segs in enumerate(plan.heads)
    ]
    return torch.cat(outs, dim=1)


# --- independent items (used by mechanisms that build their own key sets) -----------------


def _native_items(q, k, v, k2, v2, add, scale):
    """Items attention (see ``_ItemsFunction``) on the native kernels: (out, lse, qrows, krows), lse +inf for a
    row with no key (every p = 0 in the backward), the rows each item's own; None when they do not take it."""
    I, Lq, _ = q.shape
    Lk = k.shape[1] + (0 if k2 is None else k2.shape[1])
    rows = (torch.arange(Lq, device=q.device).expand(I, 1, Lq), torch.arange(Lk, device=q.device).expand(I, 1, Lk))
    found = native.items_forward(q, k, v, *rows, add, scale, k2, v2)
    if found is None:
        return None
    out, lse = found
    return out, torch.where(torch.isneginf(lse), float("inf"), lse), *rows


def _native_items_grads(saved, g, scale):
    """The native backward of ``_native_items`` from its saved (q, k, v, k2, v2, add, out, lse, qrows, krows)."""
    q, k, v, k2, v2, add, out, lse, qrows, krows = saved
    grads = native.items_backward(q, k, v, g, out, lse, qrows, krows, add, scale, k2, v2)
    if grads is None:  # the forward ran on these kernels: they stay available
        raise RuntimeError(f"native items backward: unavailable: {native.status()}")
    return grads


class _ItemsFunction(torch.autograd.Function):
    """Softmax attention inside each of I items, forward and backward: q (I, Lq, D), k (I, Lk, D),
    v (I, Lk, Dv), and optionally a second part of every item's keys k2 (I, Lk2, D), v2 (I, Lk2, Dv) (the
    item's keys are then k's rows followed by k2's); ``add`` the additive mask (0 / -inf), (..., Lq or 1,
    Lk + Lk2) with its leading dimensions running over the items in order (expanded views are read in place).

    On the native items kernels when they take the call (float32; each item one group of rows, read in
    place from both parts, its outputs and gradients written straight into the result: no per-item copies,
    no concatenation, no zero-filled gradients); else on PyTorch's fused kernel with the items as its batch
    and the parts concatenated (finite inputs only: it turns a NaN row into zeros), one head size
    E = max(D, Dv) (zero columns change no score or output)."""

    @staticmethod
    def forward(ctx, q, k, v, k2, v2, add, scale):
        I, Lq, _ = q.shape
        Lk, Lk2 = k.shape[1], 0 if k2 is None else k2.shape[1]
        ctx.scale, ctx.parts = scale, (Lk, Lk2)
        found = _native_items(q, k, v, k2, v2, add, scale)
        ctx.native = found is not None
        if ctx.native:
            out, lse, qrows, krows = found
            ctx.save_for_backward(q, k, v, k2, v2, add, out, lse, qrows, krows)
            return out
        if k2 is not None:
            k, v = torch.cat([k, k2], 1), torch.cat([v, v2], 1)
        E = max(q.shape[-1], v.shape[-1])
        q4, k4, v4 = (F.pad(t, (0, E - t.shape[-1])).unsqueeze(1) for t in (q, k, v))
        add4 = add.expand(*add.shape[:-2], add.shape[-2], Lk + Lk2).reshape(I, 1, add.shape[-2], Lk + Lk2)
        # a row with no allowed key: the kernel reports lse 0, and exp(-inf - 0) = 0 in its backward
        o, lse = _fwd(q4, k4, v4, 0.0, False, attn_mask=add4, scale=scale)
        ctx.save_for_backward(q4, k4, v4, add4, o, lse)
        ctx.dims = q.shape[-1], v.shape[-1]
        return o[:, 0, :, :v.shape[-1]]

    @staticmethod
    @first_order
    def backward(ctx, g):
        Lk, Lk2 = ctx.parts
        if ctx.native:
            grads = _native_items_grads(ctx.saved_tensors, g, ctx.scale)
            return (*grads, *[None] * (7 - len(grads)))
        q4, k4, v4, add4, o, lse = ctx.saved_tensors
        D, Dv = ctx.dims
        g4 = F.pad(g, (0, o.shape[-1] - Dv)).unsqueeze(1).contiguous()
        gq, gk, gv = _bwd(g4, q4, k4, v4, o, lse, 0.0, False, attn_mask=add4, scale=ctx.scale)
        gk, gv = gk[:, 0, :, :D], gv[:, 0, :, :Dv]
        second = (gk[:, Lk:], gv[:, Lk:]) if Lk2 else (None, None)
        return gq[:, 0, :, :D], gk[:, :Lk], gv[:, :Lk], *second, None, None


def items_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, *,
                    scale: float, k2: torch.Tensor | None = None, v2: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention inside each of a batch of independent items, with gradients.

    q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv) with the same leading dims; optionally a second part of
    each item's keys and values, k2 (..., Lk2, D) and v2 (..., Lk2, Dv): the item then attends to
    concatenate([k, k2], -2) (and the values alike), which is never built on the native kernels.
    ``allowed`` bool broadcastable to (..., Lq, Lk + Lk2), True = may attend (None = all). A row with no
    allowed key gives 0. On CPU with finite inputs this is one call of the native items kernels (float32) or
    of PyTorch's fused kernel, with no Lq x Lk tensor besides the mask; otherwise plain differentiable ops.
    Returns (..., Lq, Dv) in q's dtype.
    """
    if (k2 is None) != (v2 is None):
        raise ValueError("k2 and v2 go together: give both or neither")
    lead, (Lq, D), (Lk, Dv) = q.shape[:-2], q.shape[-2:], v.shape[-2:]
    Lk2 = 0 if k2 is None else k2.shape[-2]
    if k2 is not None and (k2.shape[:-2] != lead or k2.shape[-1] != D or v2.shape[:-2] != lead or
                           v2.shape[-2:] != (Lk2, Dv)):
        raise ValueError(f"k2 and v2 must be (..., Lk2, {D}) and (..., Lk2, {Dv}) over q's leading dimensions "
                         f"{tuple(lead)}, got {tuple(k2.shape)} and {tuple(v2.shape)}")
    if k2 is not None and (k2.dtype != k.dtype or v2.dtype != v.dtype):
        raise TypeError(f"k2 and v2 must have k's and v's dtypes ({k.dtype}, {v.dtype}), got {k2.dtype}, {v2.dtype}")
    if allowed is None:
        allowed = torch.ones(1, 1, dtype=torch.bool, device=q.device)
    if q.device.type != "cpu" or not all_finite(q, k, v, *([] if k2 is None else [k2, v2])):
        if k2 is not None:
            k, v = torch.cat([k, k2], -2), torch.cat([v, v2], -2)
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        return torch.matmul(masked_softmax(s, allowed), v.to(s.dtype)).to(q.dtype)
    allowed = allowed.expand(*lead, allowed.shape[-2], Lk + Lk2)  # rows may stay broadcast (size 1)
    add = _additive(allowed, q.dtype)
    I = math.prod(lead)  # (explicit sizes: a -1 cannot be inferred when a length is 0)
    second = (None, None) if k2 is None else (k2.reshape(I, Lk2, D), v2.reshape(I, Lk2, Dv))
    out = _ItemsFunction.apply(q.reshape(I, Lq, D), k.reshape(I, Lk, D), v.reshape(I, Lk, Dv), *second, add, scale)
    return out.reshape(*lead, Lq, Dv)


class _MixedItemsFunction(torch.autograd.Function):
    """Native items attention whose second part of every item's keys and values mixes its group's first
    parts: q (G·n, Lq, D), k (G·n, Lk, D), v (G·n, Lk, Dv) in groups of n items, p (G, n, n), and k2, v2 the
    mixtures p @ k, p @ v (values, computed by the caller). The backward adds the mixtures' gradients into
    dk and dv in place (``baddbmm_``) and gives p's; autograd through the product would build two more
    gradient tensors per source and add them (at N = 16384 each is 32 MiB, mapped and page-faulted in
    afresh by glibc on every call)."""

    @staticmethod
    def forward(ctx, q, k, v, p, k2, v2, add, scale):
        found = _native_items(q, k, v, k2, v2, add, scale)
        if found is None:  # the caller checked that these kernels take the call
            raise RuntimeError(f"native items forward: unavailable: {native.status()}")
        out, lse, qrows, krows = found
        ctx.save_for_backward(q, k, v, k2, v2, add, out, lse, qrows, krows, p)
        ctx.scale = scale
        return out

    @staticmethod
    @first_order
    def backward(ctx, g):
        *saved, p = ctx.saved_tensors
        dq, dk, dv, dk2, dv2 = _native_items_grads(saved, g, ctx.scale)
        G, n = p.shape[:2]
        k, v = saved[1], saved[2]

        def groups(x):  # (G·n, L, E) -> (G, n, L·E)
            return x.reshape(G, n, x.shape[1] * x.shape[2])
        dp = None
        if ctx.needs_input_grad[3]:
            dp = torch.bmm(groups(dk2), groups(k).transpose(1, 2)).baddbmm_(groups(dv2), groups(v).transpose(1, 2))
        pt = p.transpose(1, 2)
        dk.view(groups(dk).shape).baddbmm_(pt, groups(dk2))  # into dk and dv themselves (view: never a copy)
        dv.view(groups(dv).shape).baddbmm_(pt, groups(dv2))
        return dq, dk, dv, dp, None, None, None, None


def mixed_items_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor,
                          allowed: torch.Tensor | None, *, scale: float) -> torch.Tensor:
    """Items attention in groups of n items, each item against its own keys followed by a mixture of its
    group's items' keys (Sinkhorn's soft sorting of blocks): ``items_attention(q, k, v, allowed,
    k2=p @ k, v2=p @ v)`` with the mixtures taken over whole items, with gradients for q, k, v and p.

    q (..., n, Lq, D), k (..., n, Lk, D), v (..., n, Lk, Dv), p (..., n, n); ``allowed`` broadcastable to
    (..., n, Lq, 2·Lk). On CPU in float32 with finite inputs and mixtures the native items kernels read
    the mixtures in place and the backward adds into dk and dv (``_MixedItemsFunction``); otherwise
    ``items_attention``. Returns (..., n, Lq, Dv) in q's dtype.
    """
    lead, n, (Lq, D), (Lk, Dv) = p.shape[:-2], p.shape[-1], q.shape[-2:], v.shape[-2:]
    if p.dim() < 2 or p.shape[-2] != n:
        raise ValueError(f"p must be (..., n, n), got {tuple(p.shape)}")
    if not q.dtype == k.dtype == v.dtype == p.dtype:
        raise TypeError(f"q, k, v and p must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {p.dtype}")
    if q.shape[:-2] != (*lead, n) or k.shape != (*lead, n, Lk, D) or v.shape[:-2] != (*lead, n):
        raise ValueError(f"q, k, v must be (..., {n}, L, E) over p's leading dimensions {tuple(lead)}, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")

    def mix(x, out=None):  # Σ_j p_ij x_j over whole items
        return torch.matmul(p, x.flatten(-2), out=out).view(x.shape)
    if q.device.type == "cpu" and q.dtype == torch.float32 and native.items_available():
        with torch.no_grad():  # into fresh tensors advised to be huge pages (see native.empty)
            k2, v2 = (mix(x, native.empty(*x.shape[:-2], x.shape[-2] * x.shape[-1])) for x in (k, v))
        if all_finite(q, k, v, k2, v2):
            allowed = torch.ones(1, 1, dtype=torch.bool, device=q.device) if allowed is None else allowed
            add = _additive(allowed.expand(*lead, n, allowed.shape[-2], 2 * Lk), q.dtype)
            G = math.prod(lead)
            out = _MixedItemsFunction.apply(q.reshape(G * n, Lq, D), k.reshape(G * n, Lk, D),
                                            v.reshape(G * n, Lk, Dv), p.reshape(G, n, n), k2.reshape(G * n, Lk, D),
                                            v2.reshape(G * n, Lk, Dv), add, scale)
            return out.reshape(*lead, n, Lq, Dv)
    return items_attention(q, k, v, allowed, scale=scale, k2=mix(k), v2=mix(v))
