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

Native cores. For elu+1, relu, FAVOR+ and callables (features computed first, under autograd) in
float32 on CPU, both modes run as C kernels (sparse_attention/native/linear.c) when they are built with
vectors of 32 bytes or more: each step is one pass over the rows with the features computed in cache
(FAVOR+'s by a product with the projection per block of rows) and never stored, and the causal mode is
the exact recurrence over blocks of 4 rows (no chunk_size: it applies to the PyTorch cores only).
Memory beyond q, k, v and the output: the denominators and F × (Dv + 1) states. At N=4096, B=1, H=8,
D=64 that took the elu forward from 9.1 to 4.3 ms and fwd+bwd from 25.5 to 12.8 ms; causal 16.6 to 4.8
ms and 41.9 to 21.4 ms (benchmarks/RESULTS.md, table a); FAVOR+ (F=266) fwd+bwd at N=16384 from
632-671 to 346-351 ms. Elsewhere (float64, no compiler, GPUs) the PyTorch cores below run.

Execution, memory and gradients. Both modes run in blocks of rows (see "the cores" below): features
are computed block by block; the backward, written by hand, reuses them while they fit a budget (always
for elu and relu, whose features are the size of q and k) and recomputes them otherwise. Causal mode cuts
the sequence into chunks of ``chunk_size`` (C) keys; the blocks are visited in order with a carried
state, and inside a block all chunks are handled at once: each chunk's φ(K_c)ᵀ[V_c, 1] (F × (Dv + 1),
the last column is the denominator's Σφ(k)), an exclusive prefix sum of those over chunks (the state
every chunk starts from), and the masked C × C block of φ(Q_c)φ(K_c)ᵀ. Nothing of size N × N is ever
built. Memory beyond q, k, v and the output: without gradients a block's working set (independent of
N); with gradients the denominators, the features within their budget, and in causal mode each
chunk's state and C × C scores, O(N·(C + F·Dv/C)) per head, which is O(N·D) for C ~ D. Time is
O(N·(C·(F + Dv) + F·Dv)).

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

from .. import native
from .._checks import check_bool, check_int, check_key_padding_mask, check_qkv, check_seed, first_order
from ..reference import zeros_from

__all__ = [
    "FeatureMap", "EluFeatureMap", "ReluFeatureMap", "FavorPlus", "resolve_feature_map",
    "LinearAttentionState", "linear_attention", "reference_linear_attention",
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

    # The blocked cores' backward needs ∂L/∂x from g = ∂L/∂φ(x) (features reused or recomputed), written
    # into ``out`` (a block of the whole gradient: no block-sized temporary and no copy) when given. The
    # defaults run autograd through a recomputation; the built-in maps override them in closed form.

    def query_vjp(self, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """∂L/∂x given y = query(x) and g = ∂L/∂y (in ``out`` if given, shaped like x)."""
        return _into(out, _autograd_vjp(self.query, x, g))

    def key_vjp(self, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """∂L/∂x given y = key(x) and g = ∂L/∂y (in ``out`` if given, shaped like x)."""
        return _into(out, _autograd_vjp(self.key, x, g))


def _autograd_vjp(fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        return torch.autograd.grad(fn(x), x, g)[0]


def _into(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x, copied into ``out`` when one is given."""
    return x if out is None else out.copy_(x)


class EluFeatureMap(FeatureMap):
    """φ(x) = elu(x) + 1 (Katharopoulos et al.), F = D."""

    name = "elu"

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x).add_(1.0)  # elu's backward reads its input, so the in-place add is safe

    def query_vjp(self, x, y, g, out=None):
        return torch.clamp(y, max=1.0, out=out).mul_(g)  # elu'(x) = 1 for x > 0 (y > 1), e^x = y for x <= 0

    key_vjp = query_vjp


class ReluFeatureMap(FeatureMap):
    """φ(x) = relu(x), F = D. A query or key whose features are all 0 gets output 0."""

    name = "relu"

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    def query_vjp(self, x, y, g, out=None):
        return torch.where(y > 0, g, torch.zeros((), dtype=g.dtype), out=out)

    key_vjp = query_vjp


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
        self.seed = check_seed(seed)
        self.orthogonal = check_bool("orthogonal", orthogonal)
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

    def get_extra_state(self) -> dict:
        """The redraw count travels with the state_dict, so a loaded module's next redraw is the one the
        saved module would have drawn (the projection itself is a buffer), with the seed of that sequence."""
        return {"draws": self.draws, "seed": self.seed}

    def set_extra_state(self, state: dict) -> None:
        self.draws = int(state["draws"])
        self.seed = int(state.get("seed", self.seed))  # (state_dicts saved before the seed was kept lack it)

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

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """W' = W / D^(1/4) (F × D) in x's dtype and device, so that w·x' = W'x."""
        self._check_dim(x)
        return self.projection.to(dtype=x.dtype, device=x.device) * self.head_dim**-0.25

    def _logits(self, x: torch.Tensor, w: torch.Tensor, sign: float) -> torch.Tensor:
        """x W'ᵀ + sign · c (…, L, F), the shift c added by the matmul itself (addmm)."""
        shift = self._shift(x.dtype, x.device)
        flat = x.reshape(-1, x.shape[-1])
        logf = torch.addmm(shift.mul_(sign), flat, w.T) if bool(shift.any()) else flat @ w.T
        return logf.view(*x.shape[:-1], -1)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """exp(w·x' + c_f - max_f(·)): the terms -|x'|²/2 and 1/√F are constant along the row, cancel in
        the normalised output, and are left out (one matmul and three passes over (…, N, F))."""
        logf = self._logits(x, self._scaled(x), 1.0)
        with torch.no_grad():
            stab = logf.amax(-1, keepdim=True)  # per query row: cancels in num / den
        return logf.sub_(stab).exp_()  # matmul/add backward do not read their output: in place is safe

    def key(self, x: torch.Tensor) -> torch.Tensor:
        """exp(w·x' - |x'|²/2 - c_f); 1/√F (the same for every key) cancels and is left out."""
        half_sq = (-0.5 / self.head_dim**0.5) * x.pow(2).sum(-1, keepdim=True)  # -|x'|²/2, (..., S, 1)
        return self._logits(x, self._scaled(x), -1.0).add_(half_sq).exp_()

    def query_vjp(self, x, y, g, out=None):
        """y = exp(W'x + c - stab) with the row stabiliser held constant (it cancels): (g ⊙ y) W'."""
        return _rows_times(g * y, self._scaled(x), out)

    def key_vjp(self, x, y, g, out=None):
        """y = exp(W'x - |x|²/(2√D) - c): (g ⊙ y) W' - (Σ_f g ⊙ y) x / √D."""
        gy = g * y
        return _rows_times(gy, self._scaled(x), out).addcmul_(gy.sum(-1, keepdim=True), x, value=-self.head_dim**-0.5)


def _rows_times(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a (…, L, F) @ w (F, D) -> (…, L, D), written into ``out`` (contiguous) when given."""
    if out is None:
        return a @ w
    torch.mm(a.reshape(-1, a.shape[-1]), w, out=out.view(-1, w.shape[-1]))
    return out


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
    """eps, added to the denominator: a finite real >= 0 (TypeError for other types, bools included)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a finite float >= 0, got {eps!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return float(eps)


class _Identity(FeatureMap):
    """φ(x) = x: the cores' feature map when the features were computed outside (by autograd)."""

    name = "identity"

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def query_vjp(self, x, y, g, out=None):
        return _into(out, g)

    key_vjp = query_vjp


#: feature maps without learnable parameters, acting row by row: computed inside the cores, chunk by
#: chunk, reused or recomputed in the backward (any other map runs first, under autograd, see _prepare)
_FUSED_MAPS = (EluFeatureMap, ReluFeatureMap, FavorPlus)


def _prepare(fm: FeatureMap, q, k, v, key_padding_mask):
    """Compute-dtype q, k, v (float32, or float64) with padded keys and values set to 0, and the map the
    cores apply: ``fm`` itself when it is a built-in, else the features computed here and the identity."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if key_padding_mask is not None:
        # where, not multiply: non-finite values at padded keys must not leak (0 * inf = nan), into
        # the output or into a feature map's stabiliser; the cores also zero their features
        pad = key_padding_mask[:, None, :, None]  # (B, 1, S, 1)
        k = torch.where(pad, torch.zeros((), dtype=k.dtype), k)
        v = torch.where(pad, torch.zeros((), dtype=v.dtype), v)
    if isinstance(fm, _FUSED_MAPS):
        return q, k, v, fm
    fq, fk = fm.query(q), fm.key(k)
    if fq.shape[:-1] != q.shape[:-1] or fk.shape[:-1] != k.shape[:-1] or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(
            f"feature map {fm.name!r} must map (..., L, D) to (..., L, F) for q and k alike, got "
            f"φ(q) {tuple(fq.shape)} and φ(k) {tuple(fk.shape)}"
        )
    return fq.to(compute), fk.to(compute), v, _Identity()


def _normalise(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    den = den + eps
    # den == 0 only when every feature product is 0, and then num == 0 too: output 0, no NaN
    return num / torch.where(den > 0, den, torch.ones((), dtype=den.dtype))


# ----------------------------------------------------------------------------- the cores
#
# Two autograd Functions with hand-written backwards, working on (BH, L, ·) tensors block by block:
# a block is a group of heads × a run of rows whose feature tensor holds about _BLOCK_BYTES. Features
# are computed per block, so no N × F tensor is ever allocated whole: every temporary is block-sized
# (fresh tensors of tens of MB are page-faulted in at a few GB/s on CPU, slower than the arithmetic on
# them). The backward reuses the forward's feature blocks while they fit in _KEEP_FEATURES_BYTES or
# in twice the size of q and k (always for elu and relu, F = D), measured 15-18% faster fwd+bwd for
# elu and FAVOR+ at N=4096 and 16384, 6% for elu at 65536; FAVOR+'s N × F features beyond the budget
# are recomputed, so memory stays O(N·D). Also saved for the backward: q, k, v, the output,
# its denominators (BH, N, 1), the small states, and in causal mode each block's chunk states and
# masked scores (recomputing them cost 6-12% of fwd+bwd). Autograd over whole-tensor ops would be
# correct too, but costs ~30 full passes and N·(F + C) saved floats.

_BLOCK_BYTES = 4 << 20
# the cores keep the features of q and k for the backward (instead of recomputing them) up to this size,
# or up to twice the size of q and k (see _keep_features)
_KEEP_FEATURES_BYTES = 128 << 20
# the causal core's blocks are 4x smaller: its per-chunk states (F × (Dv + 1) per C rows) then stay in
# cache (measured at N=4096, B=1, H=8, D=64: fwd+bwd 53-60 ms with 0.5-1 MB blocks, 67-88 ms with 2-4 MB)
_CAUSAL_SHARE = 4
_SEGMENT_ROWS = 16384  # most rows per block of the causal loop (its per-chunk states are C × F × Dv)


def _prefix(x: torch.Tensor, upper: bool) -> torch.Tensor:
    """x (heads, m, ·, ·) -> Σ_{c' < c} x_c' (upper=False) or Σ_{c' > c} x_c' (upper=True) for every c, by a
    cumulative sum of the shifted items. (Products with strict triangles of ones were faster, but 0 · NaN
    is NaN: a non-finite key or query would have reached every chunk's sum, the earlier ones included.)"""
    out = torch.zeros_like(x)
    if x.shape[1] > 1:
        if upper:
            out[:, :-1] = x[:, 1:].flip(1).cumsum(1).flip(1)
        else:
            out[:, 1:] = x[:, :-1].cumsum(1)
    return out


def _backward_follows(*xs: torch.Tensor) -> bool:
    """Whether a backward can follow a core: autograd is recording and some input requires a gradient.
    Evaluated before Function.apply: forward runs with grad mode off, and ctx.needs_input_grad reports
    the inputs' requires_grad even under torch.no_grad, where keeping features would only cost memory."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _keep_features(q: torch.Tensor, k: torch.Tensor, numel: int) -> bool:
    """Whether the backward reuses the forward's ``numel`` feature values of q and k: when they take at
    most _KEEP_FEATURES_BYTES, or no more than twice q and k themselves (elu, relu: F = D), so memory
    stays O(N·D); FAVOR+'s N × F features beyond the budget are recomputed."""
    return numel * q.element_size() <= max(_KEEP_FEATURES_BYTES, 2 * (q.numel() + k.numel()) * q.element_size())


def _blocks(BH: int, L: int, width: int, itemsize: int, unit: int = 1, share: int = 1):
    """(heads, rows) slices covering (BH, L), each head group's rows in order, a block's (heads, rows,
    width) tensor about _BLOCK_BYTES / share: whole heads while one head fits (several if they fit), else runs
    of rows (multiples of ``unit``, at most _SEGMENT_ROWS) of one head. Either way a block of a
    contiguous (BH, L, ·) tensor is contiguous (no copies)."""
    fit = _BLOCK_BYTES // (share * width * itemsize)  # rows of one head in a block
    if L <= min(fit, _SEGMENT_ROWS):
        heads, rows = max(1, min(BH, fit // L)), L
    else:
        n = -(-L // max(unit, min(fit, _SEGMENT_ROWS)))  # blocks per head; then balance their lengths
        heads, rows = 1, -(-L // (n * unit)) * unit
    for h in range(0, BH, heads):
        for r in range(0, L, rows):
            yield slice(h, min(h + heads, BH)), slice(r, min(r + rows, L))


def _divide(res: torch.Tensor, eps: float, out: torch.Tensor, den: torch.Tensor) -> None:
    """Writes out = num / den and den = Σ + eps (…, 1) from res = [num | Σ] (…, Dv + 1), into the given
    tensors (views of the whole outputs: no block-sized temporaries).

    den <= 0 happens only when every feature product is 0 (then num = 0): it is replaced by 1, so
    the row's output is 0, never NaN.
    """
    torch.add(res[..., -1:], eps, out=den)
    den.masked_fill_(den <= 0, 1.0)
    torch.div(res[..., :-1], den, out=out)


def _grad_res(g: torch.Tensor, out: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """∂L/∂[num | Σ] (…, Dv + 1) from g = ∂L/∂out (…, Dv):  [g / den | -Σ_d (g / den)·out].

    Where den was replaced by 1, out = 0, so the second part is 0 as it should be.
    """
    gres = g.new_empty(*g.shape[:-1], g.shape[-1] + 1)
    gnum = torch.div(g, den, out=gres[..., :-1])
    gres[..., -1] = torch.linalg.vecdot(gnum, out).neg_()
    return gres


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x (…, S, ·) with padded keys' rows set to 0 (keep (…, S, 1): 1 = real key, 0 = padding)."""
    return x if keep is None else x * keep


def _with_ones(v: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """[v, 1] (…, S, Dv + 1), built in ``buffer`` (1-D, at least that many elements; see _ones_buffer): one
    matmul then yields the numerator and, in the last column, the denominator (φ(K)ᵀ1 = Σ φ(k_j)). The
    buffer is reused block after block (F.pad would fill a fresh tensor with ones, then copy v over it)."""
    shape = (*v.shape[:-1], v.shape[-1] + 1)
    out = buffer[: math.prod(shape)].view(shape)
    out[..., :-1].copy_(v)
    out[..., -1] = 1.0
    return out


class _NonCausal(torch.autograd.Function):
    """out = φ(Q) [φ(K)ᵀV | φ(K)ᵀ1] normalised.  q (BH, R, D), k (BH, S, D), v (BH, S, Dv), keep
    (BH, S, 1) or None -> (BH, R, Dv). Two sweeps: over key blocks (the F × (Dv + 1) state kvz), then
    over query blocks."""

    @staticmethod
    def forward(ctx, q, k, v, keep, fm, eps, backward_follows):
        BH, R, _ = q.shape
        S, Dv = k.shape[1], v.shape[-1]
        Fd = fm.num_features(q.shape[-1])
        kvz = q.new_zeros(BH, Fd, Dv + 1)  # [Σ φ(k_j) v_jᵀ | Σ φ(k_j)]
        # the backward reuses the blocks' features when all of them fit in _KEEP_FEATURES_BYTES
        kept = ([], []) if backward_follows and _keep_features(q, k, BH * (R + S) * Fd) else None
        for h, r in _blocks(BH, S, Fd, q.element_size()):
            fk = fm.key(k[h, r])
            if kept is not None:
                kept[1].append(fk)
            fk = _masked(fk, None if keep is None else keep[h, r])
            kvz[h, :, :Dv].baddbmm_(fk.transpose(1, 2), v[h, r])
            kvz[h, :, Dv] += fk.sum(1)
        out, den = q.new_empty(BH, R, Dv), q.new_empty(BH, R, 1)
        for h, r in _blocks(BH, R, Fd, q.element_size()):
            fq = fm.query(q[h, r])
            if kept is not None:
                kept[0].append(fq)
            _divide(torch.bmm(fq, kvz[h]), eps, out[h, r], den[h, r])
        ctx.fm, ctx.eps, ctx.kept = fm, eps, kept
        ctx.save_for_backward(q, k, v, keep, kvz, out, den)
        return out

    @staticmethod
    @first_order
    def backward(ctx, g):
        q, k, v, keep, kvz, out, den = ctx.saved_tensors
        fm, (BH, R, _), (S, Dv) = ctx.fm, q.shape, (k.shape[1], v.shape[-1])
        Fd = kvz.shape[1]
        # contiguous (empty_like keeps a transposed input's strides; the blocks below are written as row views)
        gq, gk, gv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        gkvz = torch.zeros_like(kvz)  # ∂L/∂[Σ φ(k) vᵀ | Σ φ(k)]
        fqs, fks = ctx.kept if ctx.kept is not None else (None, None)
        for i, (h, r) in enumerate(_blocks(BH, R, Fd, q.element_size())):
            gres = _grad_res(g[h, r], out[h, r], den[h, r])  # (heads, rows, Dv + 1)
            fq = fm.query(q[h, r]) if fqs is None else fqs[i]
            gkvz[h].baddbmm_(fq.transpose(1, 2), gres)
            fm.query_vjp(q[h, r], fq, torch.bmm(gres, kvz[h].transpose(1, 2)), out=gq[h, r])
        gkv, gz = gkvz[..., :Dv], gkvz[..., Dv:].transpose(1, 2)  # (BH, F, Dv), (BH, 1, F)
        for i, (h, r) in enumerate(_blocks(BH, S, Fd, q.element_size())):
            kp = None if keep is None else keep[h, r]
            fk = fm.key(k[h, r]) if fks is None else fks[i]
            torch.bmm(_masked(fk, kp), gkv[h], out=gv[h, r])
            # (bmm then a broadcast add: baddbmm would first copy gz out to every row)
            gfk = torch.bmm(v[h, r], gkv[h].transpose(1, 2)).add_(gz[h])
            fm.key_vjp(k[h, r], fk, _masked(gfk, kp), out=gk[h, r])
        return gq, gk, gv, None, None, None, None


def _ones_buffer(blocks, Dv: int, like: torch.Tensor) -> torch.Tensor:
    """Room for the largest block's [v, 1] (see _with_ones)."""
    return like.new_empty(max((h.stop - h.start) * (r.stop - r.start) for h, r in blocks) * (Dv + 1))


class _Causal(torch.autograd.Function):
    """Chunked causal linear attention.  q, k (BH, L, D), v (BH, L, Dv), keep (BH, L, 1) or None,
    L a multiple of the chunk size C -> (BH, L, Dv).

    Blocks of rows (multiples of C) are visited in order, carrying per head the state
    [Σ φ(k_j) v_jᵀ | Σ φ(k_j)] (F × (Dv + 1)) of every earlier row. Inside a block, for each chunk c:
        res_c = tril(φQ_c φK_cᵀ) [V_c, 1] + φQ_c st_c,      st_c = state + Σ_{c' < c} φK_c'ᵀ [V_c', 1]
    all chunks at once (batched matmuls). The backward visits the blocks in reverse, carrying ∂L/∂state.
    """

    @staticmethod
    def _block(fq, fk, v, state, C, ones_buffer):
        """A block's per-chunk matrices ((heads·m, C, ·)) of φ(q), φ(k) and [v, 1] (built in ones_buffer),
        the per-chunk start states st (heads·m, F, Dv + 1), the masked scores, and the state after the
        block. fq, fk (heads, rows, F) with padded keys' rows 0; v (heads, rows, Dv); state (heads, 1, F,
        Dv + 1)."""
        hb, Lb, _ = fq.shape
        fq, fk = fq.reshape(-1, C, fq.shape[-1]), fk.reshape(-1, C, fk.shape[-1])
        v1 = _with_ones(v, ones_buffer).view(-1, C, state.shape[-1])
        kv = torch.bmm(fk.transpose(1, 2), v1).view(hb, Lb // C, *state.shape[-2:])
        # the state each chunk starts from: state + Σ_{c' < c} kv_c' (an exclusive prefix sum)
        st = _prefix(kv, upper=False).add_(state).view(-1, *state.shape[-2:])
        scores = torch.bmm(fq, fk.transpose(1, 2)).tril_()  # (heads·m, C, C), j <= i inside the chunk
        return fq, fk, v1, st, scores, state + kv.sum(1, keepdim=True)

    @staticmethod
    def forward(ctx, q, k, v, keep, fm, eps, C, backward_follows):
        BH, L, _ = q.shape
        Dv = v.shape[-1]
        Fd = fm.num_features(q.shape[-1])
        out, den = q.new_empty(BH, L, Dv), q.new_empty(BH, L, 1)
        starts = []  # the state at the start of each block, for the backward
        kept = [] if backward_follows else None  # each block's (st, scores), for the backward
        keep_features = kept is not None and _keep_features(q, k, 2 * BH * L * Fd)
        state = None
        blocks = list(_blocks(BH, L, max(Fd, C), q.element_size(), unit=C, share=_CAUSAL_SHARE))
        ones = _ones_buffer(blocks, Dv, q)
        for h, r in blocks:
            if r.start == 0:
                state = q.new_zeros(h.stop - h.start, 1, Fd, Dv + 1)
            starts.append(state)
            fq_raw, fk_raw = fm.query(q[h, r]), fm.key(k[h, r])
            fk = _masked(fk_raw, None if keep is None else keep[h, r])
            fq, _, v1, st, scores, state = _Causal._block(fq_raw, fk, v[h, r], state, C, ones)
            if kept is not None:
                kept.append((st, scores) + ((fq_raw, fk_raw) if keep_features else ()))
            # (bmm then baddbmm_ in place: baddbmm would first copy its input into a new tensor)
            res = torch.bmm(scores, v1).baddbmm_(fq, st).view(-1, r.stop - r.start, Dv + 1)
            _divide(res, eps, out[h, r], den[h, r])
        ctx.fm, ctx.C, ctx.starts, ctx.kept = fm, C, starts, kept
        ctx.save_for_backward(q, k, v, keep, out, den)
        return out

    @staticmethod
    @first_order
    def backward(ctx, g):
        q, k, v, keep, out, den = ctx.saved_tensors
        fm, C, (BH, L, _), Dv = ctx.fm, ctx.C, q.shape, v.shape[-1]
        Fd = fm.num_features(q.shape[-1])
        # contiguous (empty_like keeps a transposed input's strides; the blocks below are written as row views)
        gq, gk, gv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        blocks = list(_blocks(BH, L, max(Fd, C), q.element_size(), unit=C, share=_CAUSAL_SHARE))
        ones = _ones_buffer(blocks, Dv, q)
        gstate = None  # ∂L/∂(state after the block), from the later blocks of the same heads
        for i, ((h, r), start) in reversed(list(enumerate(zip(blocks, ctx.starts, strict=True)))):
            if r.stop == L:
                gstate = torch.zeros_like(start)
            hb, Lb = start.shape[0], r.stop - r.start
            kp = None if keep is None else keep[h, r]
            st, scores, *features = ctx.kept[i]  # (the backward runs only when some input needs a gradient)
            fq_raw, fk_raw = features if features else (fm.query(q[h, r]), fm.key(k[h, r]))
            fq, fk = fq_raw.view(-1, C, Fd), _masked(fk_raw, kp).view(-1, C, Fd)
            v1 = _with_ones(v[h, r], ones).view(-1, C, Dv + 1)
            gres = _grad_res(g[h, r].reshape(-1, C, Dv), out[h, r].reshape(-1, C, Dv),
                             den[h, r].reshape(-1, C, 1))
            gst = torch.bmm(fq.transpose(1, 2), gres).view(hb, Lb // C, Fd, Dv + 1)
            # chunk c's kv reaches every later chunk's st and the carried state: an exclusive suffix
            # sum Σ_{c' > c} gst_c' (total - prefix would cancel catastrophically)
            gkv = _prefix(gst, upper=True).add_(gstate).view(-1, Fd, Dv + 1)
            gstate = gstate + gst.sum(1, keepdim=True)
            gscores = torch.bmm(gres, v1.transpose(1, 2)).tril_()
            gfq = torch.bmm(gscores, fk).baddbmm_(gres, st.transpose(1, 2))
            gfk = torch.bmm(gscores.transpose(1, 2), fq).baddbmm_(v1, gkv.transpose(1, 2))
            # ∂L/∂v: the first Dv columns of ∂L/∂[v, 1], written in place
            gvb = torch.bmm(scores.transpose(1, 2), gres[..., :Dv], out=gv[h, r].view(-1, C, Dv))
            gvb.baddbmm_(fk, gkv[..., :Dv])
            fm.query_vjp(q[h, r], fq_raw, gfq.view(hb, Lb, Fd), out=gq[h, r])
            fm.key_vjp(k[h, r], fk_raw, _masked(gfk.view(hb, Lb, Fd), kp), out=gk[h, r])
        return gq, gk, gv, None, None, None, None, None


class _Native(torch.autograd.Function):
    """Both cores as native kernels (sparse_attention/native/linear.c) for elu+1, relu, FAVOR+ and features
    computed beforehand, float32 on CPU: each step one pass over the rows, the features computed in cache
    and never stored. q (H·G, R, D), k (H, S, D), v (H, S, Dv), keep (H, S) or None; ``group`` None
    (non-causal, query heads folded into R) or the query heads per key head (causal, R == S); ``favor``
    FAVOR+'s scaled projection and shift, or None. Saved for the backward: the inputs, out, den (·, R)
    and, non-causal, the F × (Dv + 1) states."""

    @staticmethod
    def forward(ctx, q, k, v, keep, kind, eps, group, favor):
        out, den, kvz = native.linear_forward(q, k, v, keep, kind, eps, group, favor)
        ctx.kind, ctx.group, ctx.favor = kind, group, favor
        ctx.save_for_backward(q, k, v, keep, kvz, out, den)
        return out

    @staticmethod
    @first_order
    def backward(ctx, g):
        q, k, v, keep, kvz, out, den = ctx.saved_tensors
        grads = native.linear_backward(q, k, v, keep, ctx.kind, ctx.group, kvz, g, out, den, ctx.favor)
        if grads is None:  # the forward ran on these kernels: they stay available
            raise RuntimeError(f"native linear attention backward unavailable: {native.status()}")
        return *grads, None, None, None, None, None


_NATIVE_MAPS = {EluFeatureMap: "elu", ReluFeatureMap: "relu", FavorPlus: "favor+", _Identity: "identity"}


def _native_kind(fm: FeatureMap, x: torch.Tensor) -> int | None:
    """The native kernels' code for the cores' map ``fm`` (exactly elu+1, relu, FAVOR+, or the identity
    after features computed beforehand) when they take x; else None (the PyTorch cores run)."""
    kind = _NATIVE_MAPS.get(type(fm))
    return None if kind is None else native.linear_map(kind, x)


class LinearAttentionState:
    """The running sums of causal linear attention over the keys seen so far, for decoding chunk by chunk:
    linear attention as an RNN (Katharopoulos et al., section 3.4), O(F·Dv) memory per key head whatever the
    length.

    Pass the same object as ``state=`` to :func:`linear_attention` (``causal=True``) with consecutive chunks
    of one sequence; each call attends to every earlier chunk through the sums and to its own keys causally,
    then adds its keys. The outputs equal one causal call over the whole sequence (up to rounding).

    Attributes:
        kvz: (B, Hkv, F, Dv + 1) [Σ φ(k) vᵀ | Σ φ(k)] in the compute dtype (float32, or float64), or None
            before the first chunk. It keeps the autograd graph of the chunks that built it (gradients
            flow across chunks); :meth:`detach_` cuts it (truncated backpropagation through time).
        length: keys seen.
    """

    def __init__(self) -> None:
        self.kvz: torch.Tensor | None = None
        self.length = 0

    def __repr__(self) -> str:
        shape = None if self.kvz is None else tuple(self.kvz.shape)
        return f"LinearAttentionState(length={self.length}, kvz={shape})"

    def detach_(self) -> LinearAttentionState:
        if self.kvz is not None:
            self.kvz = self.kvz.detach()
        return self

    def reset(self) -> None:
        self.kvz, self.length = None, 0

    def nbytes(self) -> int:
        return 0 if self.kvz is None else self.kvz.numel() * self.kvz.element_size()

    def _check(self, B: int, Hkv: int, Fd: int, Dv: int, like: torch.Tensor) -> None:
        want = (B, Hkv, Fd, Dv + 1)
        if self.kvz is not None and (tuple(self.kvz.shape) != want or self.kvz.dtype != like.dtype
                                     or self.kvz.device != like.device):
            raise ValueError(f"state holds sums of shape {tuple(self.kvz.shape)} ({self.kvz.dtype}, "
                             f"{self.kvz.device}), but this chunk needs {want} ({like.dtype}, {like.device}): "
                             "one state serves one sequence batch with one feature map")

    def _add(self, fk: torch.Tensor, v1: torch.Tensor) -> None:
        """Adds keys' features fk (B, Hkv, n, F) (padded keys' rows 0) and their [v, 1] (B, Hkv, n, Dv + 1)."""
        kvz = fk.transpose(-1, -2) @ v1
        self.kvz = kvz if self.kvz is None else self.kvz + kvz
        self.length += v1.shape[-2]


def _ones_column(v: torch.Tensor) -> torch.Tensor:
    """[v, 1] (…, L, Dv + 1): one product with it gives the numerator and, last, the denominator's Σ φ(k)."""
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


def _recurrent_chunk(q, k, v, keep, fm, eps, state: LinearAttentionState) -> torch.Tensor:
    """A chunk (B, Hq, n, ·) of causal linear attention after earlier chunks summed in ``state``: its queries
    read the state and, causally, the chunk's own keys (an n × n triangle: decoding chunks are short)."""
    B, Hq, n, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    fq = fm.query(q).view(B, Hkv, Hq // Hkv, n, -1)  # query heads grouped by key head
    fk = _masked(fm.key(k), keep)
    v1 = _ones_column(v)
    scores = (fq @ fk.unsqueeze(2).transpose(-1, -2)).tril()  # (B, Hkv, G, n, n): key j <= query i
    res = scores @ v1.unsqueeze(2) + fq @ state.kvz.unsqueeze(2)  # (B, Hkv, G, n, Dv + 1)
    state._add(fk, v1)
    return _normalise(res[..., :Dv], res[..., Dv:], eps).reshape(B, Hq, n, Dv)


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
    state: LinearAttentionState | None = None,
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

        chunk_size: C, keys per chunk in causal mode (default 64; ignored otherwise, and by the native
            cores, which run the exact recurrence in blocks of 4 rows).
        key_padding_mask: (B, S) bool, True = padding: those keys' features are set to 0.
        eps: added to the denominator (default 1e-6); a denominator of 0 gives output 0.
        state: a :class:`LinearAttentionState` to decode chunk by chunk (causal only): this chunk also
            attends to every key of the earlier chunks, and its keys are added to the state. The first
            chunk runs the fast causal core; later chunks are an n × n triangle plus the sums, so feed
            long prompts as the first chunk.

    Returns:
        (B, Hq, N, Dv) in q's dtype. A row whose keys are all padded is exactly 0, with gradient 0.
    """
    B, Hq, Hkv, N, S, D, Dv = check_qkv(q, k, v)
    fm = resolve_feature_map(feature_map)
    check_bool("causal", causal)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, S, q.device)
    eps = _check_eps(eps)
    if state is not None:
        if not isinstance(state, LinearAttentionState):
            raise TypeError(f"state must be a LinearAttentionState, got {type(state).__name__}")
        if not causal:
            raise ValueError("state (decoding chunk by chunk) needs causal=True: without causality every query "
                             "would also need the keys of later chunks")
    if causal and N != S:
        raise ValueError(
            f"causal linear attention needs N == S (query i reads the running sum of keys 0..i), got N={N}, S={S}"
        )
    if B == 0 or Hq == 0 or N == 0 or S == 0 or Dv == 0:
        return zeros_from((B, Hq, N, Dv), q, k, v)
    q32, k32, v32, fm_core = _prepare(fm, q, k, v, key_padding_mask)
    keep = None if key_padding_mask is None else (~key_padding_mask)[:, None, :, None].to(q32.dtype)  # (B, 1, S, 1)
    if state is not None:
        state._check(B, Hkv, fm_core.num_features(q32.shape[-1]), Dv, q32)
        if state.kvz is not None:
            return _recurrent_chunk(q32, k32, v32, keep, fm_core, eps, state).to(q.dtype)
        first = (_masked(fm_core.key(k32), keep), _ones_column(v32))  # the first chunk's keys, added after it
    kind = _native_kind(fm_core, q32)
    if kind is not None:
        # key head kvh's query heads kvh*G .. kvh*G+G-1 are consecutive: (B·Hkv·G, N, F) and (B·Hkv, S, ·) views
        if keep is not None:
            keep = keep.expand(B, Hkv, S, 1).reshape(B * Hkv, S)
        Dq = q32.shape[-1]
        rows = (B * Hq, N) if causal else (B * Hkv, (Hq // Hkv) * N)
        favor = None
        if isinstance(fm_core, FavorPlus):  # W' = W / D^(1/4) and the shift c, see FavorPlus.query and .key
            favor = (fm_core._scaled(q32), fm_core._shift(q32.dtype, q32.device))
        out = _Native.apply(q32.reshape(*rows, Dq), k32.reshape(B * Hkv, S, Dq), v32.reshape(B * Hkv, S, Dv), keep,
                            kind, eps, Hq // Hkv if causal else None, favor)
        out = out.view(B, Hq, N, Dv)
    elif causal:
        G = Hq // Hkv
        if G > 1:  # the state is per query head in the chunked form; (B, Hq, S, ·)
            k32, v32 = k32.repeat_interleave(G, dim=1), v32.repeat_interleave(G, dim=1)
        C = min(chunk_size, N)
        L = -(-N // C) * C
        if L != N:  # rows past the end: causal, so no real query sees their keys; their outputs are dropped
            q32, k32, v32 = (F.pad(t, (0, 0, 0, L - N)) for t in (q32, k32, v32))
            keep = None if keep is None else F.pad(keep, (0, 0, 0, L - N))
        if keep is not None:
            keep = keep.expand(B, Hq, L, 1).reshape(B * Hq, L, 1)
        out = _Causal.apply(*(t.reshape(B * Hq, L, t.shape[-1]) for t in (q32, k32, v32)), keep, fm_core, eps, C,
                            _backward_follows(q32, k32, v32))
        out = out.view(B, Hq, L, Dv)[:, :, :N]
    else:
        # query heads kvh*G .. kvh*G+G-1 share kv head kvh: fold them into the row dimension (a view)
        R = (Hq // Hkv) * N
        if keep is not None:
            keep = keep.expand(B, Hkv, S, 1).reshape(B * Hkv, S, 1)
        out = _NonCausal.apply(q32.reshape(B * Hkv, R, q32.shape[-1]), k32.reshape(B * Hkv, S, k32.shape[-1]),
                               v32.reshape(B * Hkv, S, Dv), keep, fm_core, eps, _backward_follows(q32, k32, v32))
        out = out.view(B, Hq, N, Dv)
    if state is not None:
        state._add(*first)
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
