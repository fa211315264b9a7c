"""Synthesizer attention module (Tay et al., arXiv:2005.00743): learned (synthesized) attention logits."""

from __future__ import annotations

import math
import numbers

import torch

from .._checks import check_bool, check_int, check_scale
from ..approx.synthesizer import synthesizer_attention, tile_factorized

MODES = ("dense", "random", "factorized_dense", "factorized_random")


def _factor_pair(n: int) -> tuple[int, int]:
    """a · b = n with a the largest divisor <= sqrt(n)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _check_factors(factors: object, n: int) -> tuple[int, int]:
    """``factors`` as a pair of positive ints (a, b) with a · b = n = max_len."""
    if not isinstance(factors, (tuple, list)) or len(factors) != 2 or \
            any(isinstance(f, bool) or not isinstance(f, numbers.Integral) for f in factors):
        raise TypeError(f"factors must be a pair of ints (a, b) with a * b = max_len={n}, got {factors!r}")
    a, b = int(factors[0]), int(factors[1])
    if a < 1 or b < 1 or a * b != n:
        raise ValueError(f"factors must be a pair of positive ints (a, b) with a * b = max_len={n}, "
                         f"got {factors!r}")
    return a, b


class SynthesizerAttention(torch.nn.Module):
    """softmax(synthesized logits [mixed with q·kᵀ]) V, positions up to ``max_len``.

    Args:
        max_len: L, the longest N and S accepted (shorter ones use logits[:N, :S]).
        mode: "dense" (logits of row i = W2 relu(W1 q_i + b1) + b2, over L positions),
            "random" (an L × L matrix R), "factorized_dense" (two MLPs to a and b positions, tiled and
            multiplied, a·b = L) or "factorized_random" (R = R1 R2ᵀ, rank ``rank``).
        num_heads: parameters per head (default 1 = shared by all heads).
        head_dim: D, needed by the dense modes (their MLPs read the query vector of each token,
            i.e. a linear projection of the token, so W1 composed with the q projection is the
            paper's first layer).
        hidden: MLP width, dense modes only (default head_dim).
        rank: "factorized_random" only (default 8).
        factors: (a, b) for "factorized_dense"; default the most balanced divisor pair of L.
        random_logits: initial R for "random" (L × L or num_heads × L × L); default N(0, 1).
        fixed: "random" only: R is a buffer (not trained), the paper's fixed random Synthesizer.
        mix: mix with dot-product attention, scores = (1 - α) R + α q·kᵀ·scale with a learned
            α = sigmoid(w), w initialised to 0 (α = 0.5).
        causal: query i attends keys j <= i (N == S).
        scale: of q·kᵀ, with mix=True only; default 1/sqrt(D).
        An option the chosen mode does not read (hidden, factors, rank, random_logits, fixed, scale) raises
        ValueError.

    forward(q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), *, key_padding_mask=None)
    -> (B, Hq, N, Dv). q and k are read only by the dense modes (q, whose D must be head_dim) and by mixing
    (q, k).
    """

    def __init__(self, max_len: int, *, mode: str = "dense", num_heads: int = 1, head_dim: int | None = None,
                 hidden: int | None = None, rank: int | None = None, factors: tuple[int, int] | None = None,
                 random_logits: torch.Tensor | None = None, fixed: bool = False, mix: bool = False,
                 causal: bool = False, scale: float | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {list(MODES)}")
        self.max_len = L = check_int("max_len", max_len, minimum=1)
        self.mode = mode
        self.num_heads = Hp = check_int("num_heads", num_heads, minimum=1)
        self.causal = check_bool("causal", causal)
        self.scale = None if scale is None else check_scale(scale, 1)  # None: 1/sqrt(D), D known at forward
        fixed, mix = check_bool("fixed", fixed), check_bool("mix", mix)
        self.head_dim = None
        if fixed and mode != "random":
            raise ValueError(f"fixed=True applies to mode='random' only, got mode={mode!r}")
        if random_logits is not None and mode != "random":
            raise ValueError(f"random_logits applies to mode='random' only, got mode={mode!r}")
        for name, value, modes in (("hidden", hidden, ("dense", "factorized_dense")),
                                   ("factors", factors, ("factorized_dense",)), ("rank", rank, ("factorized_random",))):
            if value is not None and mode not in modes:  # an option the mode never reads is a mistake, not a no-op
                raise ValueError(f"{name}={value!r} applies to mode={' or '.join(map(repr, modes))} only, got "
                                 f"mode={mode!r}")
        if scale is not None and not mix:
            raise ValueError(f"scale={scale!r} (of q·kᵀ) applies to mix=True only: mode={mode!r} without mixing "
                             "takes no dot product")
        if mode in ("dense", "factorized_dense"):
            if head_dim is None:
                raise ValueError(f"mode={mode!r} needs head_dim (the MLP reads each token's query vector)")
            self.head_dim = D = check_int("head_dim", head_dim, minimum=1)
            hid = D if hidden is None else check_int("hidden", hidden, minimum=1)
            if mode == "dense":
                outs = (L,)
            else:
                outs = _factor_pair(L) if factors is None else _check_factors(factors, L)
            self.mlps = torch.nn.ModuleList(_HeadMLP(Hp, D, hid, o) for o in outs)
        elif mode == "random":
            if random_logits is None:
                r = torch.randn(Hp, L, L)
            else:
                if not isinstance(random_logits, torch.Tensor) or tuple(random_logits.shape[-2:]) != (L, L) or \
                        random_logits.dim() not in (2, 3) or (random_logits.dim() == 3 and random_logits.shape[0]
                                                              not in (1, Hp)):
                    raise ValueError(f"random_logits must have shape ({L}, {L}) or ({Hp}, {L}, {L}), got "
                                     f"{getattr(random_logits, 'shape', type(random_logits).__name__)}")
                r = random_logits.detach().clone().float().expand(Hp, L, L).clone()
            if fixed:
                self.register_buffer("random_logits", r)
            else:
                self.random_logits = torch.nn.Parameter(r)
        else:  # factorized_random
            rank = 8 if rank is None else check_int("rank", rank, minimum=1)
            self.r1 = torch.nn.Parameter(torch.randn(Hp, L, rank) / rank**0.25)
            self.r2 = torch.nn.Parameter(torch.randn(Hp, L, rank) / rank**0.25)
        self.mix_weight = torch.nn.Parameter(torch.zeros(())) if mix else None

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, mode={self.mode!r}, num_heads={self.num_heads}, causal={self.causal}, " \
               f"mix={self.mix_weight is not None}"

    def logits(self, q: torch.Tensor | None, N: int, S: int) -> torch.Tensor:
        """The synthesized scores: (B, Hp, N, S) for the dense modes, (Hp, N, S) otherwise."""
        if max(N, S) > self.max_len:
            raise ValueError(f"sequence length (N={N}, S={S}) exceeds max_len={self.max_len}: the synthesized "
                             "logits have one column per position up to max_len")
        if self.mode == "random":
            return self.random_logits[:, :N, :S]
        if self.mode == "factorized_random":
            return self.r1[:, :N] @ self.r2[:, :S].transpose(-1, -2)
        assert q is not None
        if self.num_heads not in (1, q.shape[1]):
            raise ValueError(f"module has num_heads={self.num_heads} but q has Hq={q.shape[1]} heads")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q.shape[-1] must equal head_dim={self.head_dim} in mode={self.mode!r} (its MLPs read "
                             f"each query vector), got D={q.shape[-1]}")
        if self.mode == "dense":
            return self.mlps[0](q)[..., :S]
        return tile_factorized(self.mlps[0](q), self.mlps[1](q))[..., :S]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for name, t in (("q", q), ("v", v)):  # before reading their lengths (synthesizer_attention checks the rest)
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise TypeError(f"{name} must be a 4-D tensor (B, H, L, ·), got "
                                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        logits = self.logits(q, q.shape[2], v.shape[2])
        alpha = None if self.mix_weight is None else torch.sigmoid(self.mix_weight)
        return synthesizer_attention(logits, v, q=q, k=k, dot_weight=alpha, causal=self.causal,
                                     key_padding_mask=key_padding_mask, scale=self.scale)


class _HeadMLP(torch.nn.Module):
    """Per-head 2-layer MLP: x (B, H, N, D) -> (B, H, N, out), weights (Hp, ·, ·), Hp in {1, H}."""

    def __init__(self, heads: int, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(heads, d_in, hidden) / math.sqrt(d_in))
        self.b1 = torch.nn.Parameter(torch.zeros(heads, 1, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(heads, hidden, d_out) / math.sqrt(hidden))
        self.b2 = torch.nn.Parameter(torch.zeros(heads, 1, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w1.to(x.dtype) + self.b1.to(x.dtype))  # (B, H, N, hidden)
        return (h @ self.w2.to(x.dtype)).add_(self.b2.to(x.dtype))  # (B, H, N, d_out); in place: one N x d_out pass
