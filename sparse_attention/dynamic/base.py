"""Content-based sparsity: which pairs are kept depends on q and k.

A dynamic mechanism runs its own selection step and computation (``attend``), and can
say exactly which pairs it kept for given inputs (``kept``), which is what
``sa.explain`` returns, what the plotting tool draws and what the tests compare against.
Composing with a static pattern (``TopK(32) & Causal()``) restricts the selection to
the pairs the pattern allows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import native
from ..patterns.base import Pattern


def padded(x: torch.Tensor, pad: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """``F.pad(x, pad, value=value)``, or x itself when every amount is 0: F.pad copies the whole tensor
    even then, and its backward copies the gradient again."""
    return F.pad(x, pad, value=value) if any(pad) else x


def query_heads(x: torch.Tensor, Hq: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...): query head h reads head h // (Hq // Hkv) (grouped-query attention); x
    itself when Hkv == Hq (repeat_interleave copies even then)."""
    return x if x.shape[1] == Hq else x.repeat_interleave(Hq // x.shape[1], dim=1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (B, Hkv, L, E) picked per query head: idx (B, Hq, ...) holds indices into L (>= 0) of query
    head h's key/value head h // (Hq // Hkv). Returns the rows (B, Hq, ..., E) and their flat indices into
    x.reshape(B·Hkv·L, E) (for index_add_ in a backward).

    One index_select over the flattened rows: several times faster on CPU than ``gather`` with an
    expanded index.
    """
    B, Hkv, L, E = x.shape
    flat = flat_rows(idx, Hkv, L)
    return x.reshape(B * Hkv * L, E).index_select(0, flat).view(*idx.shape, E), flat


def flat_rows(idx: torch.Tensor, Hkv: int, L: int) -> torch.Tensor:
    """idx (B, Hq, ...) indices into L rows of query head h's key/value head h // (Hq // Hkv) -> the flat row
    indices (idx.numel(),) into x.reshape(B·Hkv·L, E)."""
    B, Hq = idx.shape[:2]
    base = (torch.arange(B, device=idx.device).view(B, 1) * Hkv
            + torch.arange(Hq, device=idx.device).view(1, Hq) // (Hq // Hkv)) * L  # each kv head's first row
    return (idx + base.view(B, Hq, *[1] * (idx.dim() - 2))).flatten()


class DynamicPattern:
    """Base class of content-based mechanisms (TopK, ProbSparse, ...)."""

    #: static pattern the selection is restricted to (None: every pair is a candidate)
    restrict: Pattern | None = None

    def attend(self, q, k, v, *, key_padding_mask, scale, dropout_p) -> torch.Tensor:
        """(B, Hq, N, Dv) output for validated inputs (see ``sa.attention``)."""
        raise NotImplementedError

    def kept(self, q, k, *, key_padding_mask=None, scale=None) -> torch.Tensor:
        """(B, Hq, N, S) bool: the pairs this mechanism keeps for these q, k."""
        raise NotImplementedError

    def with_restriction(self, pattern: Pattern) -> DynamicPattern:
        raise NotImplementedError

    def reference(self, q, k, v, *, key_padding_mask=None, scale=None, upcast: bool = True) -> torch.Tensor:
        """The readable reference: dense softmax attention over exactly the pairs ``kept`` reports."""
        from ..reference import reference_attention

        kept = self.kept(q, k, key_padding_mask=key_padding_mask, scale=scale)
        return reference_attention(q, k, v, kept, scale=scale, upcast=upcast)

    def __and__(self, other: object) -> DynamicPattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        restrict = other if self.restrict is None else self.restrict & other
        return self.with_restriction(restrict)

    __rand__ = __and__

    def candidates(self, n_q: int, n_k: int, q_idx: torch.Tensor, device) -> torch.Tensor | None:
        """(Hr or 1, C, S) bool: the static restriction for query indices ``q_idx`` (None: all pairs)."""
        if self.restrict is None:
            return None
        kv = torch.arange(n_k, device=device)
        m = self.restrict.allowed(q_idx.to(device).view(-1, 1), kv.view(1, -1), n_q=n_q, n_k=n_k)
        return m if m.dim() == 3 else m.unsqueeze(0)


def allowed_mask(mech: DynamicPattern, B: int, H: int, n_q: int, n_k: int, q_idx: torch.Tensor,
                 key_padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """(B or 1, H or 1, C, S) bool candidates for a chunk of queries: restriction and key padding."""
    m = mech.candidates(n_q, n_k, q_idx, device)
    m = None if m is None else m.unsqueeze(0)
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        m = keep if m is None else m & keep
    return m


def stable_order(ids: torch.Tensor, values: int) -> torch.Tensor:
    """The stable sort order of integer ids (..., L), all in [0, values): positions by ascending id,
    equal ids by position (``torch.sort(ids, stable=True).indices``). A counting sort in
    sparse_attention.native on CPU (O(L + values) per row), else torch.sort."""
    order = native.bucket_order(ids, values)
    return torch.sort(ids, dim=-1, stable=True).indices if order is None else order


def check_mechanism_fits(mechanism: Pattern | DynamicPattern | None, N: int, S: int, Hq: int, *,
                         name: str = "pattern") -> None:
    """The static part of ``mechanism`` (a pattern, or a content-based mechanism's restriction) was built
    for these lengths and, when per-head, for Hq heads (ValueError otherwise); shared by sa.attention and
    sa.explain, so both refuse the same calls."""
    if mechanism is not None and not isinstance(mechanism, (Pattern, DynamicPattern)):
        raise TypeError(f"{name} must be a sparse_attention Pattern, a content-based mechanism or None, "
                        f"got {type(mechanism).__name__}")
    static = mechanism.restrict if isinstance(mechanism, DynamicPattern) else mechanism
    if static is not None:
        static.check_lengths(N, S)
        if static.num_heads is not None and static.num_heads != Hq:
            raise ValueError(f"pattern is per-head with {static.num_heads} heads, but q has Hq={Hq} heads")
