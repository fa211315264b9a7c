"""Engines: HOW a pattern is computed. Each backend declares what it can take.

``select_backend`` asks every backend for its reasons to refuse an input; ``auto``
takes the first willing one in order of preference, and an explicit backend that
refuses raises an error listing its reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..patterns.base import Pattern
from .blocksparse import blocksparse_attention
from .dense import dense_attention, sdpa_native
from .plan import Plan, build_plan
from .residue import residue_attention, residue_eligible


@dataclass(frozen=True)
class Call:
    """What a backend needs to know to accept or refuse an attention call."""

    pattern: Pattern | None
    B: int
    Hq: int
    Hkv: int
    N: int
    S: int
    D: int
    Dv: int
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    dropout_p: float
    padded: bool  # a key_padding_mask was given


# Above this many score elements (B*H*N*S), auto prefers the block-sparse engine for
# sparse patterns: the dense mask alone would be as large.
DENSE_AUTO_LIMIT = 1 << 22


def _dense_reasons(c: Call) -> list[str]:
    return []


# A pattern visiting at least this fraction of all blocks runs no faster block-sparse,
# so auto takes the dense backend while its mask stays below DENSE_MASK_LIMIT elements.
DENSE_BLOCK_FRACTION = 0.5
DENSE_MASK_LIMIT = 1 << 25


def _visited_fraction(c: Call) -> float:
    from .tuning import choose_block

    b = choose_block(c.pattern, c.N, c.S, c.Hq // c.Hkv)
    layout = c.pattern.layout(c.N, c.S, b, device=c.device)
    return layout.blocks_kept() / max(layout.num_heads * layout.num_q_blocks * layout.num_kv_blocks, 1)


def _dense_auto_reasons(c: Call) -> list[str]:
    if sdpa_native(c.pattern, c.N, c.S, c.padded):
        return []  # SDPA's own fused kernels: no mask is built, O(N) memory
    if residue_eligible(c.pattern, c.N, c.S, c.padded):
        return ["the block-sparse engine runs Strided as dense attention within residue classes, 1/stride the work"]
    if c.B * c.Hq * c.N * c.S <= DENSE_AUTO_LIMIT:
        return []
    if c.N * c.S <= DENSE_MASK_LIMIT and _visited_fraction(c) >= DENSE_BLOCK_FRACTION:
        return []  # nearly every block is visited: the fused dense kernel with a mask is faster
    return [f"B*H*N*S={c.B * c.Hq * c.N * c.S} exceeds {DENSE_AUTO_LIMIT}: a dense mask would dominate"]


def _blocksparse_reasons(c: Call) -> list[str]:
    reasons = []
    if c.device.type not in ("cpu", "cuda"):
        reasons.append(f"device {c.device.type} is not supported (cpu, cuda)")
    if c.pattern is not None and c.pattern.num_heads is not None and c.pattern.num_heads != c.Hq:
        reasons.append(f"per-head pattern has {c.pattern.num_heads} heads but q has {c.Hq}")
    return reasons


def _blocksparse_auto_reasons(c: Call) -> list[str]:
    if sdpa_native(c.pattern, c.N, c.S, c.padded):
        return ["SDPA runs this pattern natively (full, or causal with N == S), faster"]
    return _blocksparse_reasons(c)


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable
    reasons: Callable[[Call], list[str]]
    auto_reasons: Callable[[Call], list[str]]
    description: str


def _run_blocksparse(q, k, v, pattern, *, scale, key_padding_mask=None, dropout_p=0.0, block=None):
    from .tuning import choose_block

    N, S = q.shape[2], k.shape[2]
    if residue_eligible(pattern, N, S, key_padding_mask is not None) and block is None:
        return residue_attention(q, k, v, pattern, scale=scale, key_padding_mask=key_padding_mask,
                                 dropout_p=dropout_p)  # block-diagonal once each residue class is gathered
    if pattern is None:
        from ..patterns.full import Full

        pattern = Full()
    b = block or choose_block(pattern, N, S, q.shape[1] // k.shape[1])
    plan = build_plan(pattern, pattern.layout(N, S, b, device=q.device))
    return blocksparse_attention(q, k, v, plan, scale=scale, key_padding_mask=key_padding_mask,
                                 dropout_p=dropout_p)


# auto tries them in this order
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("dense", dense_attention, _dense_reasons, _dense_auto_reasons,
                "SDPA: natively for full/causal, else with a materialised mask (O(N * S), small inputs)"),
        Backend("blocksparse", _run_blocksparse, _blocksparse_reasons, _blocksparse_auto_reasons,
                "batches each query block with the key blocks it visits into the fused kernel; O(N * keys)"),
    )
}


def select_backend(name: str, call: Call) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        why = {}
        for b in BACKENDS.values():
            r = b.auto_reasons(call)
            if not r:
                return b
            why[b.name] = r
        raise ValueError("no backend can run this call: " + "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items()))
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    b = BACKENDS[name]
    r = b.reasons(call)
    if r:
        raise ValueError(f"backend {name!r} cannot run this call: " + "; ".join(r))
    return b


__all__ = ["BACKENDS", "Backend", "Call", "Plan", "build_plan", "select_backend"]
