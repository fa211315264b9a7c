"""Kernelized linear attention: elu+1, ReLU and Performer FAVOR+ feature maps.

    out_i = φ(q_i) · Σ_j φ(k_j) v_jᵀ  /  φ(q_i) · Σ_j φ(k_j)

Computing φ(K)ᵀV first makes attention linear in the sequence length.

Papers:
  * Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with Linear
    Attention", ICML 2020, arXiv:2006.16236 (elu+1 features, causal form by prefix sums).
  * Choromanski et al., "Rethinking Attention with Performers", ICLR 2021, arXiv:2009.14794
    (FAVOR+: positive orthogonal random features, an unbiased estimator of exp(q·k/√D)).
  * The chunked causal form (quadratic inside a chunk, a running KᵀV state between chunks) follows
    Hua et al., "Transformer Quality in Linear Time", arXiv:2202.10447, and flash-linear-attention.

Causal mode, memory and gradients. The sequence is cut into chunks of ``chunk_size`` (C) keys, and
the chunks into segments of up to 16384 rows processed one after another with a carried state. In a
segment all chunks are handled at once: each chunk's φ(K_c)ᵀ[V_c, 1] (F × (Dv + 1), the last column
is the denominator's Σφ(k)), an exclusive prefix sum of those over chunks (the state every chunk starts
from), and the masked C × C block of φ(Q_c)φ(K_c)ᵀ. Nothing of size N × N is ever built. Per head,
forward memory is O(N·(F + Dv)) for the features plus, per segment, O(T·C + T·F·Dv/C) (T rows):
without gradients that is bounded independently of N, so O(N·D + chunk²)-like. With gradients
autograd keeps every segment's tensors, O(N·(F + Dv + C + F·Dv/C)), which is O(N·D) for C ≥ F
(no custom backward). Time is O(N·(C·(F + Dv) + F·Dv)).

Numerics. Half-precision inputs are computed in float32 and cast back. The normaliser is guarded:
a row whose denominator is 0 (every key padded, or ReLU features that are all zero) gives output 0
and zero gradient, never NaN. ``eps`` is added to the denominator (default 1e-6, as in
fast-transformers). FAVOR+ query features are divided by their row maximum (a per-row constant
that cancels in the ratio), so for FAVOR+ ``eps`` acts on that stabilised scale (as in
performer-pytorch); keys are never stabilised by a statistic over other keys (see FavorPlus).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._checks import check_bool, check_int, check_key_padding_mask, check_qkv

__all__ = [
    "FeatureMap", "EluFeatureMap", "ReluFeatureMap", "FavorPlus", "resolve_feature_map",
    "linear_attention", "reference_linear_attention",
]


# ----------------------------------------------------------------------------- feature maps


class FeatureMap:
    """Maps q (..., N, D) to φ(q) (..., N, F) and k (..., S, D) to φ(k) (..., S, F), all entries >= 0.

    Both must act row by row (a key's features depend on that key only: causal mode relies on it).
    ``query`` and ``key`` may differ (FAVOR+ stabilises them differently); a constant factor per
    query row cancels in the normalised output.
    """

    name = "custom"

    def query(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x)

    def num_features(self, head_dim: int) -> int:
        return head_dim


class EluFeatureMap(FeatureMap):
    """φ(x) = elu(x) + 1 (Katharopoulos et al.), F = D."""

    name = "elu"

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x).add_(1.0)  # elu's backward reads its input, so the in-place add is safe


class ReluFeatureMap(FeatureMap):
    """φ(x) = relu(x), F = D. A query or key whose features are all 0 gets output 0."""

    name = "relu"

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class _CallableFeatureMap(FeatureMap):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class FavorPlus(torch.nn.Module, FeatureMap):
    """FAVOR+ positive orthogonal random features (Performer), approximating exp(q·k/√D).

    With x' = x / D^(1/4) and W (F × D) random:  φ(x) = exp(W x' - |x'|²/2) / √F, so that
    E[φ(q)·φ(k)] = exp(q'·k') = exp(q·k/√D) exactly (each row of W is marginally N(0, I_D)).
    Rows come in blocks of D mutually orthogonal directions (QR of a Gaussian matrix), each row
    rescaled to the norm of an independent Gaussian vector (orthogonal random features lower the
    variance; Choromanski et al. 2021, Thm. 2).

    Args:
        head_dim: D.
        num_features: F; default round(D · ln D) (266 for D = 64, performer-pytorch's default).
        seed: the draw is a pure function of (seed, number of redraws): deterministic.
        orthogonal: False draws i.i.d. Gaussian rows (the plain positive random features).

    It is a parameter-free ``nn.Module`` so that the projection (a buffer, float32) follows
    ``.to(device)`` and ``state_dict``. ``redraw()`` draws a fresh projection.
    """

    name = "favor+"
    projection: torch.Tensor

    def __init__(self, head_dim: int, num_features: int | None = None, *, seed: int = 0, orthogonal: bool = True):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        if num_features is None:
            num_features = max(1, round(head_dim * math.log(head_dim))) if head_dim > 1 else 1
        self.features = check_int("num_features", num_features, minimum=1)
        self.seed = check_int("seed", seed)
        self.orthogonal = bool(orthogonal)
        self.draws = 0
        self.register_buffer("projection", self._draw(), persistent=True)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.features}, seed={self.seed}, draws={self.draws}"

    def num_features(self, head_dim: int) -> int:
        return self.features

    def _draw(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.draws) % (2**63))
        D, m = self.head_dim, self.features
        if self.orthogonal:
            blocks = []
            for _ in range(-(-m // D)):
                q, r = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
                q = q * torch.sign(torch.diagonal(r))  # Haar-distributed (fixes QR's sign ambiguity)
                blocks.append(q.T)  # rows orthonormal
            rows = torch.cat(blocks)[:m]  # (F, D)
            norms = torch.randn(m, D, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
            w = rows * norms
        else:
            w = torch.randn(m, D, generator=gen, dtype=torch.float64)
        return w.to(torch.float32)

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw a new projection (deterministic: the k-th redraw of a seed is always the same)."""
        self.draws += 1
        self.projection.copy_(self._draw().to(self.projection.device))

    def _check_dim(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"FavorPlus was built for head_dim={self.head_dim}, got inputs with D={x.shape[-1]}")

    def _log_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_dim(x)
        x = x * self.head_dim**-0.25
        w = self.projection.to(dtype=x.dtype, device=x.device)
        return x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)  # (..., L, F)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) without stabilisation (can overflow): the estimator itself, E[φ(q)·φ(k)] = exp(q·k/√D)."""
        return torch.exp(self._log_features(x)) / math.sqrt(self.features)

    def _shift(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Per-feature constant c_f moved from the keys to the queries (it cancels in φ(q)·φ(k)).

        Since w·x - |x|²/2 <= |w|²/2 for every x, a key's log-feature minus c_f = max(|w_f|²/2 - 40, 0)
        is at most 40: key features never overflow (even summed over 10^6 keys), with no data-dependent
        stabiliser over keys. A global max over keys (performer-pytorch's choice) would let a future key
        change earlier outputs in causal mode, through eps and underflow.
        """
        w = self.projection.to(dtype=dtype, device=device)
        return (0.5 * (w * w).sum(-1) - 40.0).clamp_min(0.0)  # (F,)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """exp(w·x' + c_f - max_f(·)): the terms -|x'|²/2 and 1/√F are constant along the row, cancel in
        the normalised output, and are left out (one matmul and three passes over (…, N, F))."""
        w = self.projection.to(dtype=x.dtype, device=x.device)
        self._check_dim(x)
        logf = x @ (w * self.head_dim**-0.25).T  # (..., N, F)
        shift = self._shift(x.dtype, x.device)
        if bool(shift.any()):
            logf = logf + shift
        with torch.no_grad():
            stab = logf.amax(-1, keepdim=True)  # per query row: cancels in num / den
        return logf.sub_(stab).exp_()  # matmul/add backward do not read their output: in place is safe

    def key(self, x: torch.Tensor) -> torch.Tensor:
        """exp(w·x' - |x'|²/2 - c_f); 1/√F (the same for every key) cancels and is left out."""
        w = self.projection.to(dtype=x.dtype, device=x.device)
        self._check_dim(x)
        half_sq = (-0.5 / self.head_dim**0.5) * x.pow(2).sum(-1, keepdim=True)  # -|x'|²/2, (..., S, 1)
        shift = self._shift(x.dtype, x.device)
        wt = (w * self.head_dim**-0.25).T  # (D, F)
        logf = (x @ wt).add_(half_sq)  # matmul's backward does not read its output: in place is safe
        if bool(shift.any()):
            logf = logf.sub_(shift)
        return logf.exp_()


FEATURE_MAPS: dict[str, type[FeatureMap]] = {"elu": EluFeatureMap, "relu": ReluFeatureMap}


def resolve_feature_map(feature_map: object) -> FeatureMap:
    """A name ("elu", "relu"), a FeatureMap (e.g. :class:`FavorPlus`), or a callable x -> φ(x) >= 0."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"unknown feature_map {feature_map!r}; known: {sorted(FEATURE_MAPS)}, or pass a FeatureMap "
                "object such as sparse_attention.approx.FavorPlus(head_dim) or a callable"
            )
        return FEATURE_MAPS[feature_map]()
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if callable(feature_map):
        return _CallableFeatureMap(feature_map)
    raise TypeError(f"feature_map must be a name, a FeatureMap or a callable, got {type(feature_map).__name__}")


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return float(eps)


def _features(fm: FeatureMap, q, k, v, key_padding_mask):
    """φ(q), φ(k) in float32 (or float64), with padded keys' features and values set to 0."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if key_padding_mask is not None:
        # where, not multiply: non-finite values at padded keys must not leak (0 * inf = nan), into
        # the output or into a feature map's stabiliser; their features are zeroed below
        pad = key_padding_mask[:, None, :, None]  # (B, 1, S, 1)
        k = torch.where(pad, torch.zeros((), dtype=k.dtype), k)
        v = torch.where(pad, torch.zeros((), dtype=v.dtype), v)
    fq, fk = fm.query(q), fm.key(k)
    if fq.shape[:-1] != q.shape[:-1] or fk.shape[:-1] != k.shape[:-1] or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(
            f"feature map {fm.name!r} must map (..., L, D) to (..., L, F) for q and k alike, got "
            f"φ(q) {tuple(fq.shape)} and φ(k) {tuple(fk.shape)}"
        )
    if key_padding_mask is not None:
        fk = torch.where(pad, torch.zeros((), dtype=fk.dtype), fk)
    return fq, fk, v


def _normalise(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    den = den + eps
    # den == 0 only when every feature product is 0, and then num == 0 too: output 0, no NaN
    return num / torch.where(den > 0, den, torch.ones((), dtype=den.dtype))


_SEGMENT_ROWS = 16384  # rows per segment of the causal loop (bounds the per-chunk working set)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """[v, 1] (…, S, Dv + 1): one matmul then yields the numerator and, in the last column, the
    denominator (φ(K)ᵀ1 = Σ φ(k_j)); fewer passes than a separate row sum, forward and backward."""
    return F.pad(v, (0, 1), value=1.0)


def _split_normalise(res: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalise(res[..., :-1], res[..., -1:], eps)


def _noncausal(fq, fk, v, eps):
    B, Hq, N, Fd = fq.shape
    Hkv, Dv = fk.shape[1], v.shape[-1]
    G = Hq // Hkv
    kvz = fk.transpose(-1, -2) @ _with_ones(v)  # (B, Hkv, F, Dv + 1): [Σ φ(k) vᵀ, Σ φ(k)]
    # query heads kvh*G .. kvh*G+G-1 share kv head kvh: fold them into the row dimension (a view)
    fqg = fq.reshape(B, Hkv, G * N, Fd)
    out = _split_normalise(fqg @ kvz, eps)  # (B, Hkv, G*N, Dv)
    return out.reshape(B, Hq, N, Dv)


def _causal(fq, fk, v, eps, C, T):
    """Chunked causal form over segments of T rows (a multiple of C), carrying the state between them.

    Inside a segment every chunk is handled at once (C × C scores and one F × (Dv + 1) state per
    chunk); the loop over segments bounds that working set independently of N.
    """
    B, H, N, Fd = fq.shape
    BH = B * H
    v = _with_ones(v)  # (B, H, N, Dv + 1)
    Dv1 = v.shape[-1]
    state = fq.new_zeros(BH, 1, Fd, Dv1)  # [Σ φ(k_j) v_jᵀ, Σ φ(k_j)] over the rows before this segment
    outs = []
    # split (not slicing in the loop): autograd then joins the segment gradients with one cat, where
    # slicing would allocate a zero gradient of the full length for every segment
    for fq_s, fk_s, v_s in zip(fq.split(T, 2), fk.split(T, 2), v.split(T, 2), strict=True):
        L = fq_s.shape[2]
        nc = -(-L // C)
        if nc * C != L:  # zero features at the padded tail contribute nothing; padded rows are dropped
            fq_s, fk_s, v_s = (F.pad(t, (0, 0, 0, nc * C - L)) for t in (fq_s, fk_s, v_s))
        fq_s = fq_s.reshape(BH * nc, C, Fd)
        fk_s = fk_s.reshape(BH * nc, C, Fd)
        v_s = v_s.reshape(BH * nc, C, Dv1)
        kv = torch.bmm(fk_s.transpose(1, 2), v_s).view(BH, nc, Fd, Dv1)  # per chunk φ(K_c)ᵀ [V_c, 1]
        # state each chunk starts from: the carried state plus the chunks before it in this segment
        # (cumsum's backward does not read its output, so adding the carried state in place is safe)
        st = torch.cat([state, kv[:, :-1].cumsum(1).add_(state)], 1).view(BH * nc, Fd, Dv1)
        state = state + kv.sum(1, keepdim=True)
        scores = torch.bmm(fq_s, fk_s.transpose(1, 2)).tril_()  # (BH*nc, C, C), j <= i in the chunk
        res = torch.baddbmm(torch.bmm(scores, v_s), fq_s, st)  # (BH*nc, C, Dv + 1)
        outs.append(_split_normalise(res, eps).view(B, H, nc * C, Dv1 - 1)[:, :, :L])
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | FeatureMap | Callable[[torch.Tensor], torch.Tensor] = "elu",
    causal: bool = False,
    chunk_size: int = 64,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention  out_i = φ(q_i) Σ_j φ(k_j) v_jᵀ / (φ(q_i) · Σ_j φ(k_j) + eps)  in O(N) time.

    Args:
        q: (B, Hq, N, D) queries.
        k: (B, Hkv, S, D) keys; Hq a multiple of Hkv, query head h reads key/value head
            h // (Hq // Hkv).
        v: (B, Hkv, S, Dv) values.
        feature_map: "elu" (elu+1, default), "relu", a :class:`FeatureMap` such as
            :class:`FavorPlus` (Performer), or a callable x (..., L, D) -> φ(x) (..., L, F) >= 0.
        causal: query i sums over keys j <= i only; needs N == S (ValueError otherwise):

                k: 0 1 2 3
            q 0:   1 0 0 0
            q 1:   1 1 0 0
            q 2:   1 1 1 0
            q 3:   1 1 1 1

        chunk_size: C, keys per chunk in causal mode (default 64; ignored otherwise).
        key_padding_mask: (B, S) bool, True = padding: those keys' features are set to 0.
        eps: added to the denominator (default 1e-6); a denominator of 0 gives output 0.

    Returns:
        (B, Hq, N, Dv) in q's dtype. A row whose keys are all padded is exactly 0, with gradient 0.
    """
    B, Hq, Hkv, N, S, D, Dv = check_qkv(q, k, v)
    fm = resolve_feature_map(feature_map)
    check_bool("causal", causal)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, S, q.device)
    eps = _check_eps(eps)
    if causal and N != S:
        raise ValueError(
            f"causal linear attention needs N == S (query i reads the running sum of keys 0..i), got N={N}, S={S}"
        )
    if N == 0 or S == 0 or Dv == 0:
        return (q.sum() * 0 + k.sum() * 0 + v.sum() * 0).expand(B, Hq, N, Dv).clone()
    fq, fk, vv = _features(fm, q, k, v, key_padding_mask)
    if causal:
        G = Hq // Hkv
        if G > 1:  # the state is per query head in the chunked form; (B, Hq, S, ·)
            fk, vv = fk.repeat_interleave(G, dim=1), vv.repeat_interleave(G, dim=1)
        C = min(chunk_size, N)
        out = _causal(fq, fk, vv, eps, C, C * max(1, _SEGMENT_ROWS // C))
    else:
        out = _noncausal(fq, fk, vv, eps)
    return out.to(q.dtype)


def reference_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | FeatureMap | Callable[[torch.Tensor], torch.Tensor] = "elu",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    upcast: bool = True,
) -> torch.Tensor:
    """The readable quadratic form: A = φ(Q)φ(K)ᵀ (B, Hq, N, S), masked; out = A V / (A·1 + eps).

    Same arguments as :func:`linear_attention`. ``upcast=False`` computes in the input dtype (the
    same-dtype baseline of the tolerance rule). Causal mode uses a top-left tril(N, S) mask.
    """
    fm = resolve_feature_map(feature_map)
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    G = q.shape[1] // k.shape[1]
    if key_padding_mask is not None:  # padded keys never reach the feature map (see linear_attention)
        k = torch.where(key_padding_mask[:, None, :, None], torch.zeros((), dtype=k.dtype), k)
    fq, fk = fm.query(q), fm.key(k)
    fk, v = fk.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, Hq, S, ·)
    A = fq @ fk.transpose(-1, -2)  # (B, Hq, N, S)
    keep = torch.ones(A.shape[-2:], dtype=torch.bool, device=A.device)
    if causal:
        keep = torch.tril(keep)
    keep = keep.expand(A.shape)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
        v = torch.where(key_padding_mask[:, None, :, None], torch.zeros((), dtype=v.dtype), v)
    A = torch.where(keep, A, torch.zeros((), dtype=A.dtype))
    return _normalise(A @ v, A.sum(-1, keepdim=True), eps).to(dtype)
