"""Linformer attention module (Wang et al., arXiv:2006.04768): learned E, F projections of K and V."""

from __future__ import annotations

import math

import torch

from .._checks import check_bool, check_int, check_scale
from ..approx._common import sdpa, zero_padded
from ..approx.linformer import check_projection, linformer_attention


class LinformerAttention(torch.nn.Module):
    """Attention to K and V projected along the sequence from ``seq_len`` to ``k`` positions.

    Args:
        seq_len: L, the longest sequence accepted; shorter ones use the first S columns of E, F.
        k: K, projected length (k = seq_len with identity E, F is exact attention).
        num_heads: None (default) = one E (and F) shared by all heads; an int = one per key/value head.
        share_kv: True = F is E (one projection for keys and values). Sharing across layers: pass
            the same module to each layer.
        causal: must be False; True raises ValueError explaining why.
        scale: default 1/sqrt(D).

    Parameters E, F: (K, L) or (num_heads, K, L), initialised N(0, 1/K) (as the linformer package).
    forward(q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), *, key_padding_mask=None)
    -> (B, Hq, N, Dv); S > seq_len raises ValueError.
    """

    def __init__(self, seq_len: int, k: int, *, num_heads: int | None = None, share_kv: bool = False,
                 causal: bool = False, scale: float | None = None):
        super().__init__()
        self.seq_len = check_int("seq_len", seq_len, minimum=1)
        self.k = check_int("k", k, minimum=1)
        if check_bool("causal", causal):
            raise ValueError("LinformerAttention cannot be causal: every projected key mixes all positions, so "
                             "query i would read keys after i; use PerformerAttention(causal=True) or "
                             "sparse_attention.linear_attention(causal=True)")
        heads = () if num_heads is None else (check_int("num_heads", num_heads, minimum=1),)
        self.num_heads = num_heads
        share_kv = check_bool("share_kv", share_kv)
        self.scale = None if scale is None else check_scale(scale, 1)  # None: 1/sqrt(D), D known at forward
        self.e_proj = torch.nn.Parameter(torch.randn(*heads, self.k, self.seq_len) / math.sqrt(self.k))
        self.f_proj = None if share_kv else torch.nn.Parameter(
            torch.randn(*heads, self.k, self.seq_len) / math.sqrt(self.k))

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, k={self.k}, num_heads={self.num_heads}, share_kv={self.f_proj is None}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return linformer_attention(q, k, v, e_proj=self.e_proj, f_proj=self.f_proj,
                                   key_padding_mask=key_padding_mask, scale=self.scale)

    def attend_compressed(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """Attention of q (B, Hq, N, D) to already mixed keys E·k and values F·v (B, Hkv, K, D|Dv)."""
        return sdpa(q, kc, vc, scale=check_scale(self.scale, q.shape[-1]))

    # --- inside a MultiheadAttention: E and F applied before the key/value projections ----------------------

    def folds_projections(self, in_features: int, num_kv_heads: int, head_dim: int, *, shared_input: bool) -> bool:
        """Whether E·(X W_kᵀ + b_k) is cheaper as (E X) W_kᵀ + (E 1) b_kᵀ (and F likewise) for inputs X of
        ``in_features``: the sequence is shortened before it is projected. Per input position, the
        products cost K·in_features per distinct (E or F, input) pair when one E serves every head,
        against in_features·Hkv·D + K·Hkv·D per projection the other way round. ``shared_input``: the
        keys and values are one tensor (then one E X serves both when F is E). Per-head E and F
        (``num_heads`` given) are not folded: each head would mix the whole input."""
        if self.e_proj.dim() != 2:
            return False
        pairs = 1 if (self.f_proj is None and shared_input) else 2
        folded = pairs * self.k * in_features
        projected = 2 * (in_features + self.k) * num_kv_heads * head_dim
        return folded < projected

    def compress_inputs(self, key: torch.Tensor, value: torch.Tensor, k_proj, v_proj, num_kv_heads: int, *,
                        key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """E·k and F·v from the layer's inputs: key (B, S, kdim), value (B, S, vdim), the projections
        ``k_proj = (W_k (Hkv·D, kdim), b_k or None)`` and ``v_proj`` alike -> (B, Hkv, K, D) each.

        The same as projecting first (``forward`` on the projected k, v): padded positions are left out
        of the mixtures (their rows set to 0, bias included), the bias enters as (E keep) b_kᵀ.
        """
        B, S = key.shape[:2]
        e = self.e_proj
        f = e if self.f_proj is None else self.f_proj
        check_projection("e_proj", e, num_kv_heads, S, key.dtype, key.device)
        check_projection("f_proj", f, num_kv_heads, S, key.dtype, key.device)
        keep = None if key_padding_mask is None else (~key_padding_mask).to(key.dtype)  # (B, S)

        def mixed(p, x):  # E (K, L) sliced to S columns, times the real rows of x (B, S, F) -> (B, K, F)
            return p[..., :S].to(x.dtype) @ zero_padded(x, key_padding_mask)

        def projected(p, xp, proj):  # (B, K, F) -> (B, Hkv, K, D)
            w, b = proj
            out = torch.nn.functional.linear(xp, w)
            if b is not None:
                mass = p[..., :S].to(xp.dtype).sum(-1) if keep is None else keep @ p[..., :S].to(xp.dtype).T  # (B|1, K)
                out = out + mass.unsqueeze(-1) * b
            return out.view(B, self.k, num_kv_heads, out.shape[-1] // num_kv_heads).transpose(1, 2)

        xe = mixed(e, key)
        xf = xe if (f is e and value is key) else mixed(f, value)
        return projected(e, xe, k_proj), projected(f, xf, v_proj)
