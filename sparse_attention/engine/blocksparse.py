"""Block-sparse engine: run a plan of dense kernel calls and merge them exactly.

Every segment of the plan (see ``plan.py``) is one call of PyTorch's fused attention
kernel on a batch of (query block, key blocks) items. Each call returns its output
and the log-sum-exp (LSE) of its scores; the rows are merged exactly:

    lse = logaddexp(lse_1, lse_2, ...),   out = sum_s exp(lse_s - lse) * out_s

The backward calls the kernel's backward per segment with the *merged* output and
LSE, which gives each segment's exact share of dQ, dK and dV (the same identity
flash-attention's backward relies on), so nothing of size N x S is ever built.

Memory: K/V of a segment whose key blocks form a sliding run are read through a
strided view (no copy); gathered K/V and masks are processed in row chunks of at most
``CHUNK_BYTES``, so peak memory is O(N * keys per query) and never O(N * S).

Tensor layout inside the engine (G = Hq // Hkv query heads per key/value head):
    qf: (B*Hkv, QB, G*b, D)  query blocks, the G heads of a group stacked per block
    kf: (B*Hkv, KB*b, D)     keys padded to whole blocks
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..patterns.base import ANTICAUSAL, CAUSAL, FULL
from .plan import Plan, Segment

# Budget for the K/V (gathered, or the kernel's gradient buffers of a view) and mask of
# one chunk of a segment.
CHUNK_BYTES = 128 << 20

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


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


class _Chunk:
    """The tensors of one kernel call: items rows[i] x key blocks kv[i]."""

    def __init__(self, seg: Segment, lo: int, hi: int):
        self.seg = seg
        self.lo, self.hi = lo, hi
        self.rows = seg.rows[lo:hi]
        self.kv = seg.kv[lo:hi]

    def take_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (BH, QB, ...) -> (BH, R, ...) for this chunk's query blocks."""
        if self.seg.row_start is not None:
            s = self.seg.row_start + self.lo
            return x[:, s : s + self.hi - self.lo]
        return x.index_select(1, self.rows)

    def max_rows(self, acc: torch.Tensor, x: torch.Tensor) -> None:
        """acc[:, rows] = max(acc[:, rows], x)."""
        if self.seg.row_start is not None:
            s = self.seg.row_start + self.lo
            torch.maximum(acc[:, s : s + self.hi - self.lo], x, out=acc[:, s : s + self.hi - self.lo])
        else:
            acc.index_copy_(1, self.rows, torch.maximum(acc.index_select(1, self.rows), x))

    def put_rows(self, acc: torch.Tensor, x: torch.Tensor) -> None:
        """acc[:, rows] += x (rows are distinct within a segment)."""
        if self.seg.row_start is not None:
            s = self.seg.row_start + self.lo
            acc[:, s : s + self.hi - self.lo] += x
        else:
            acc.index_add_(1, self.rows, x)

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

    def put_keys(self, acc: torch.Tensor, x: torch.Tensor, b: int) -> None:
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
            for t in range(K):
                acc[:, start + t : start + t + (R - 1) * step + 1 : step] += x[:, :, t]
            return
        acc.index_add_(1, self.kv.flatten(), x.reshape(BH, R * K, b, E))

    def bool_mask(self, G: int, kpm_f: torch.Tensor | None, b: int, triangles: bool = False) -> torch.Tensor | None:
        """(BH or 1, R, G*b, K*b) bool mask of this call, or None when the kernel needs none.

        ``triangles``: give causal/anti-causal blocks an explicit mask instead of is_causal.
        """
        seg = self.seg
        R, K = self.kv.shape
        L = K * b
        if seg.mask is not None:
            m = seg.mask[self.lo : self.hi]
        elif kpm_f is None and not (triangles and seg.kind != FULL):
            return None
        elif seg.kind == FULL:
            m = torch.ones(R, b, L, dtype=torch.bool, device=self.kv.device)
        else:
            ar = torch.arange(b, device=self.kv.device)
            tri = ar.view(-1, 1) >= ar.view(1, -1) if seg.kind == CAUSAL else ar.view(-1, 1) <= ar.view(1, -1)
            m = tri.expand(R, b, b)
        m = m.unsqueeze(1).expand(R, G, b, L).reshape(1, R, G * b, L)
        if kpm_f is not None:
            # kpm_f: (BH, KB*b) True = key may be attended
            keep = self.take_keys(kpm_f.unsqueeze(-1), b).squeeze(-1)  # (BH, R, L)
            m = m & keep.unsqueeze(2)
        return m


def _chunks(seg: Segment, BH: int, b: int, G: int, D: int, Dv: int, itemsize: int, dirty: bool):
    """Split a segment into row chunks within CHUNK_BYTES."""
    R, K = seg.kv.shape
    L = K * b
    # gathered K/V in the forward, the kernel's dK/dV buffers in the backward (views too)
    per_row = BH * L * (D + Dv) * itemsize
    if seg.mask is not None or dirty:
        per_row += (BH if dirty else 1) * G * b * L * (itemsize + 1)
    step = max(1, CHUNK_BYTES // per_row)
    return [_Chunk(seg, lo, min(R, lo + step)) for lo in range(0, R, step)]


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _flip(x: torch.Tensor) -> torch.Tensor:
    """Reverse dim -2 of (..., b, E); a row gather, several times faster than Tensor.flip on CPU."""
    b, E = x.shape[-2:]
    n = x.numel() // (b * E)
    idx = _reversed_rows(n, b, x.device)
    return x.reshape(n * b, E).index_select(0, idx).view(x.shape)


@functools.lru_cache(maxsize=16)
def _reversed_rows(n: int, b: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, device=device).view(-1, 1) * b + torch.arange(b - 1, -1, -1, device=device)).flatten()


class _Operands:
    """The folded tensors of one call, and their block-reversed copies made on first use.

    Anti-causal blocks (j >= i) run as causal blocks on reversed rows and columns; when
    such segments span many rows, reversing each whole tensor once is cheaper than
    reversing every chunk.
    """

    def __init__(self, b: int, G: int, **tensors: torch.Tensor):
        self.b, self.G = b, G
        self.plain = tensors
        self.rev: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.plain[name]

    def reversed(self, name: str) -> torch.Tensor:
        if name not in self.rev:
            x = self.plain[name]
            if x.dim() == 3 and name in ("k", "v"):  # (BH, KB*b, E): reverse each key block
                r = _flip(x.view(x.shape[0], -1, self.b, x.shape[-1])).view(x.shape)
            elif x.dim() == 4:  # (BH, QB, G*b, E): reverse each query block of each head
                r = _flip(x.reshape(x.shape[0], -1, self.b, x.shape[-1])).view(x.shape)
            else:  # lse (BH, QB, G*b)
                r = x.view(*x.shape[:2], self.G, self.b).flip(-1).reshape(x.shape)
            self.rev[name] = r
        return self.rev[name]


def _kernel_inputs(ch: _Chunk, ops: _Operands, kpm_f, scale: float):
    """q, k, v, additive-ready bool mask and is_causal for one kernel call on this chunk."""
    b, G = ops.b, ops.G
    # the CPU kernel's is_causal yields NaN for scale <= 0 (its -inf mask is scaled too;
    # SDPA itself has this bug in torch 2.13): use an explicit mask there
    mask = ch.bool_mask(G, kpm_f, b, triangles=scale <= 0)
    causal = ch.seg.kind in (CAUSAL, ANTICAUSAL) and mask is None
    anti = causal and ch.seg.kind == ANTICAUSAL  # j >= i is causal on reversed rows and columns
    get = ops.reversed if anti else ops.__getitem__
    q = ch.take_rows(get("q"))  # (BH, R, G*b, D)
    k, v = ch.take_keys(get("k"), b), ch.take_keys(get("v"), b)
    if causal:
        BH, R = q.shape[:2]
        q = q.reshape(BH, R * G, b, q.shape[-1])  # GQA form: R*G query heads over R key heads
    return q, k, v, mask, causal, get


def _from_kernel(x: torch.Tensor, ch: _Chunk, causal: bool, BH: int, lse: bool = False) -> torch.Tensor:
    """Undo the GQA reshaping and reversal of _kernel_inputs on a kernel output."""
    if causal and ch.seg.kind == ANTICAUSAL:
        x = x.flip(-1) if lse else _flip(x)
    R = ch.hi - ch.lo
    return x.reshape(BH, R, -1) if lse else x.reshape(BH, R, -1, x.shape[-1])


def _merge(parts, BH: int, QB: int, Gb: int, Dv: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of per-chunk (out, lse) into out (BH, QB, G*b, Dv) and lse (BH, QB, G*b).

    lse = log(sum_s exp(lse_s)) per row, out = sum_s exp(lse_s - lse) * out_s; a row no
    chunk reached, or whose every key is masked, has lse = -inf and out = 0.
    """
    if not parts:
        return (torch.zeros(BH, QB, Gb, Dv, dtype=dtype, device=device),
                torch.full((BH, QB, Gb), float("-inf"), dtype=dtype, device=device))
    row_max = torch.full((BH, QB, Gb), float("-inf"), dtype=dtype, device=device)
    for ch, _, l in parts:
        ch.max_rows(row_max, l)
    safe_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    total = torch.zeros_like(row_max)
    for ch, _, l in parts:
        ch.put_rows(total, torch.exp(l - ch.take_rows(safe_max)))
    lse = safe_max + torch.log(total)  # log(0) = -inf for rows with no key
    safe_lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    out = torch.zeros(BH, QB, Gb, Dv, dtype=dtype, device=device)
    for ch, o, l in parts:
        w = torch.exp(l - ch.take_rows(safe_lse)).unsqueeze(-1)
        ch.put_rows(out, o * w)
    return out, lse


def _dirty_blocks(kpm_f: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """(KB,) bool: key blocks holding a padded key in any batch element."""
    if kpm_f is None:
        return None
    return (~kpm_f).view(kpm_f.shape[0], -1, b).any(-1).any(0)


def _is_dirty(seg: Segment, dirty: torch.Tensor | None) -> bool:
    return dirty is not None and bool(dirty[seg.kv].any())


def forward_segments(plan_segments, qf, kf, vf, G, b, scale, kpm_f):
    """Run every segment; returns out (BH, QB, G*b, Dv) and lse (BH, QB, G*b) in the accumulation dtype."""
    BH, QB, Gb, D = qf.shape
    Dv = vf.shape[-1]
    dirty = _dirty_blocks(kpm_f, b)
    ops = _Operands(b, G, q=qf, k=kf, v=vf)
    parts = []
    for seg in plan_segments:
        seg_kpm = kpm_f if _is_dirty(seg, dirty) else None
        for ch in _chunks(seg, BH, b, G, D, Dv, qf.element_size(), seg_kpm is not None):
            q, k, v, mask, causal, _ = _kernel_inputs(ch, ops, seg_kpm, scale)
            add = None if mask is None else _additive(mask, q.dtype)
            o, l = _fwd(q, k, v, 0.0, causal, attn_mask=add, scale=scale)
            o = _from_kernel(o, ch, causal, BH)
            l = _from_kernel(l, ch, causal, BH, lse=True)
            if mask is not None:  # the kernel reports lse=0 for a row with no allowed key
                l = torch.where(mask.any(-1), l, torch.full_like(l, float("-inf")))
            parts.append((ch, o, l.to(_acc(qf))))
    return _merge(parts, BH, QB, Gb, Dv, _acc(qf), qf.device)


def backward_segments(plan_segments, qf, kf, vf, G, b, scale, kpm_f, out, lse, dout):
    """Gradients (float32) dq (BH, QB, G*b, D), dk (BH, KB, b, D), dv (BH, KB, b, Dv)."""
    BH, QB, Gb, D = qf.shape
    Dv = vf.shape[-1]
    KB = kf.shape[1] // b
    dq = torch.zeros(BH, QB, Gb, D, dtype=_acc(qf), device=qf.device)
    dk = torch.zeros(BH, KB, b, D, dtype=_acc(qf), device=qf.device)
    dv = torch.zeros(BH, KB, b, Dv, dtype=_acc(qf), device=qf.device)
    # a row with no allowed key has lse=-inf; +inf makes every exp(score - lse) exactly 0
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    dirty = _dirty_blocks(kpm_f, b)
    ops = _Operands(b, G, q=qf, k=kf, v=vf, out=out, lse=lse, dout=dout)
    for seg in plan_segments:
        seg_kpm = kpm_f if _is_dirty(seg, dirty) else None
        for ch in _chunks(seg, BH, b, G, D, Dv, qf.element_size(), seg_kpm is not None):
            q, k, v, mask, causal, get = _kernel_inputs(ch, ops, seg_kpm, scale)
            add = None if mask is None else _additive(mask, q.dtype)
            o, l, g = ch.take_rows(get("out")), ch.take_rows(get("lse")), ch.take_rows(get("dout"))
            if causal:
                o, g = o.reshape(q.shape[:-1] + (Dv,)), g.reshape(q.shape[:-1] + (Dv,))
                l = l.reshape(q.shape[:-1])
            gq, gk, gv = _bwd(g, q, k, v, o, l, 0.0, causal, attn_mask=add, scale=scale)
            if causal and ch.seg.kind == ANTICAUSAL:
                gq, gk, gv = _flip(gq), _flip(gk), _flip(gv)
            ch.put_rows(dq, gq.reshape(BH, ch.hi - ch.lo, Gb, D).to(dq.dtype))
            ch.put_keys(dk, gk.to(dk.dtype), b)
            ch.put_keys(dv, gv.to(dv.dtype), b)
    return dq, dk, dv


def math_segments(plan_segments, qf, kf, vf, G, b, scale, kpm_f, dropout_p):
    """The same plan run with plain autograd ops (dropout, non-finite inputs).

    Returns out (BH, QB, G*b, Dv) in float32 (half inputs are upcast).
    """
    BH, QB, Gb, D = qf.shape
    Dv = vf.shape[-1]
    upcast = qf.dtype in (torch.float16, torch.bfloat16)
    chunks = []
    dirty = _dirty_blocks(kpm_f, b)
    for seg in plan_segments:
        seg_kpm = kpm_f if _is_dirty(seg, dirty) else None
        for ch in _chunks(seg, BH, b, G, D, Dv, qf.element_size(), seg_kpm is not None):
            q, k, v = ch.take_rows(qf), ch.take_keys(kf, b), ch.take_keys(vf, b)
            if upcast:
                q, k, v = q.float(), k.float(), v.float()
            s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (BH, R, G*b, L)
            mask = ch.bool_mask(G, seg_kpm, b, triangles=True)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            chunks.append((ch, s, v))
    lse = torch.full((BH, QB, Gb), float("-inf"), dtype=_acc(qf), device=qf.device)
    for ch, s, _ in chunks:  # rows are distinct within a chunk
        part = torch.logsumexp(s, -1)
        if ch.seg.row_start is not None:
            st = ch.seg.row_start + ch.lo
            lse = torch.cat([lse[:, :st], torch.logaddexp(lse[:, st : st + ch.hi - ch.lo], part),
                             lse[:, st + ch.hi - ch.lo :]], 1)
        else:
            lse = lse.index_copy(1, ch.rows, torch.logaddexp(lse.index_select(1, ch.rows), part))
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.zeros(BH, QB, Gb, Dv, dtype=_acc(qf), device=qf.device)
    for ch, s, v in chunks:
        p = torch.exp(s - ch.take_rows(safe).unsqueeze(-1))
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        out = out.index_add(1, ch.rows, torch.matmul(p, v))
    return out


class _BlockSparseFunction(torch.autograd.Function):
    """Forward and backward of one shared layout, straight on the fused CPU kernel."""

    @staticmethod
    def forward(ctx, q, k, v, plan_segments, G, b, scale, kpm_f, QB, KB):
        qf = fold_queries(q, k.shape[1], b, QB)
        kf, vf = fold_keys(k, b, KB), fold_keys(v, b, KB)
        out, lse = forward_segments(plan_segments, qf, kf, vf, G, b, scale, kpm_f)
        out = out.to(q.dtype)
        # the folded copies are kept (not q, k, v) so the backward does not fold again
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.args = (plan_segments, G, b, scale, kpm_f, q.shape, k.shape, v.shape)
        return unfold_queries(out, q.shape[0], q.shape[1], q.shape[2])

    @staticmethod
    def backward(ctx, grad):
        qf, kf, vf, out, lse = ctx.saved_tensors
        plan_segments, G, b, scale, kpm_f, q_shape, k_shape, v_shape = ctx.args
        B, Hq, N, _ = q_shape
        _, Hkv, S, _ = k_shape
        QB, KB = qf.shape[1], kf.shape[1] // b
        gf = fold_queries(grad.to(qf.dtype), Hkv, b, QB).contiguous()
        dq, dk, dv = backward_segments(plan_segments, qf, kf, vf, G, b, scale, kpm_f, out, lse, gf)
        dq = unfold_queries(dq, B, Hq, N).to(qf.dtype)
        dk = dk.view(B, Hkv, KB * b, -1)[:, :, :S].to(kf.dtype)
        dv = dv.view(B, Hkv, KB * b, -1)[:, :, :S].to(vf.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None


def _run_shared(segments, q, k, v, b, scale, key_padding_mask, dropout_p, exact_kernel):
    """Attention for heads sharing one layout. q (B, Hq, N, D) -> (B, Hq, N, Dv)."""
    B, Hq, N, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    QB, KB = -(-N // b), -(-S // b)
    kpm_f = None
    if key_padding_mask is not None:
        keep = F.pad(~key_padding_mask, (0, KB * b - S))  # (B, KB*b), padding past S is never read
        kpm_f = keep.unsqueeze(1).expand(B, Hkv, KB * b).reshape(B * Hkv, KB * b)
    if exact_kernel:
        D, Dv = q.shape[-1], v.shape[-1]
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
    """True when no element is NaN or inf (a sum is non-finite when any element is: one read, no temporary)."""
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def blocksparse_attention(q, k, v, plan: Plan, *, scale: float, key_padding_mask=None, dropout_p=0.0):
    """Execute ``plan`` on validated inputs q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv)."""
    b = plan.block
    # The fused CPU kernel has no dropout, and turns a NaN query row into zeros (#141128):
    # those cases, and other devices, run the same plan with plain differentiable ops,
    # which propagate NaN like SDPA's math path.
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
