"""Nyström attention: a low-rank approximation of softmax attention through m landmarks.

    out = softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V       (scores scaled by 1/sqrt(D))

Q̃, K̃ (m × D) are segment means of Q and K (m contiguous segments, sizes differing by at most 1).
pinv is the Moore-Penrose pseudo-inverse by the iterative method of Razavi et al. (2014) as used by
Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention",
AAAI 2021, arXiv:2102.03902 (eq. 14):

    Z_0 = Aᵀ / (‖A‖_1 ‖A‖_∞),   Z_{j+1} = ¼ Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))

With m = N = S every segment is one position, the three kernels are the full attention matrix A,
and out = A pinv(A) A V = A V: softmax attention, up to the pinv residual ‖I - A Z‖ (the iteration
converges to pinv(A) for any A; each step shrinks the residual as r -> r^3 once it is below 1, so a
well-conditioned A needs few iterations, an ill-conditioned one more).
Not included: the paper's optional depthwise-convolution skip on V. No causal mode (landmarks mix
all positions).
"""

from __future__ import annotations

import torch

from .._checks import check_int, check_key_padding_mask, check_qkv, check_scale
from ..reference import zeros_from
from ._common import compute_dtype, masked_softmax, zero_padded

__all__ = ["iterative_pinv", "segment_means", "nystrom_attention", "reference_nystrom_attention"]


def iterative_pinv(a: torch.Tensor, *, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a (..., m, m) by the iteration above; a zero matrix gives 0."""
    iterations = check_int("iterations", iterations, minimum=0)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)  # ‖A‖_1 ‖A‖_∞, (...)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    z = a.transpose(-1, -2) / norm[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_means(x: torch.Tensor, m: int, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of m contiguous segments of x (B, H, L, D) along L: (B, H, m, D), and which are non-empty.

    Segment j covers [floor(j·L/m), floor((j+1)·L/m)). ``keep`` (B, L) bool restricts the mean to
    kept rows; a segment with none kept has mean 0 and is reported empty, (B, 1, m) bool.
    """
    B, H, L, D = x.shape
    ends = ((torch.arange(1, m + 1, device=x.device) * L) // m).contiguous()  # (m,)
    seg = torch.bucketize(torch.arange(L, device=x.device), ends, right=True)  # each row's segment
    w = torch.ones(B, L, dtype=x.dtype, device=x.device) if keep is None else keep.to(x.dtype)
    if keep is not None:  # where, not a product: inf/NaN in a row left out never reach a mean
        x = torch.where(keep[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    # sums per segment (not differences of prefix sums, through which one non-finite row reached every
    # later segment)
    total = x.new_zeros(B, H, m, D).index_add_(2, seg, x)  # (B, H, m, D)
    count = w.new_zeros(B, m).index_add_(1, seg, w)[:, None, :, None]  # (B, 1, m, 1)
    return total / count.clamp_min(1), (count > 0)[..., 0]


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_landmarks: int,
    pinv_iterations: int = 6,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Nyström approximation of softmax attention.

    Args:
        q: (B, Hq, N, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv); GQA as in ``sa.attention``.
        num_landmarks: m, 1 <= m <= min(N, S) (ValueError otherwise: a segment would be empty).
        pinv_iterations: iterations of the pseudo-inverse (default 6, the paper's).
        key_padding_mask: (B, S) bool, True = padding: left out of the key landmarks' means and of
            softmax(Q̃ Kᵀ); a landmark made only of padding is masked. All keys padded -> output 0.
            With N == S (self-attention) padded tokens are also left out of the query landmarks'
            means, so that padding never changes the outputs of real tokens.
        scale: default 1/sqrt(D).

    Returns:
        (B, Hq, N, Dv) in q's dtype. Time and memory O((N + S)·m + m³) per head, never N × S.
    """
    B, Hq, Hkv, N, S, D, Dv = check_qkv(q, k, v)
    m = check_int("num_landmarks", num_landmarks, minimum=1)
    pinv_iterations = check_int("pinv_iterations", pinv_iterations, minimum=0)
    if m > min(N, S):
        raise ValueError(f"num_landmarks={m} must be <= min(N, S) = {min(N, S)} (N={N}, S={S}): each landmark "
                         "is the mean of a non-empty segment")
    key_padding_mask = check_key_padding_mask(key_padding_mask, B, S, q.device)
    scale = check_scale(scale, D)
    if B == 0 or Hq == 0 or Dv == 0:  # no batch entry, head or value channel: an empty output
        return zeros_from((B, Hq, N, Dv), q, k, v)
    in_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    G = Hq // Hkv
    q, k, v = q.to(dtype), zero_padded(k.to(dtype), key_padding_mask), zero_padded(v.to(dtype), key_padding_mask)
    keep_k = None if key_padding_mask is None else ~key_padding_mask
    # self-attention: a padded token is a padded query too; it must not move the query landmarks
    q_l, _ = segment_means(q, m, keep_k if N == S else None)  # (B, Hq, m, D)
    k_l, k_l_ok = segment_means(k, m, keep_k)  # (B, Hkv, m, D), (B, 1, m)
    if G > 1:
        k, v, k_l = (t.repeat_interleave(G, dim=1) for t in (k, v, k_l))  # (B, Hq, ·, ·)
    lm_keep = k_l_ok[:, :, None, :]  # (B, 1, 1, m)
    kernel1 = masked_softmax(q @ k_l.transpose(-1, -2) * scale, lm_keep)  # (B, Hq, N, m)
    kernel2 = masked_softmax(q_l @ k_l.transpose(-1, -2) * scale, lm_keep)  # (B, Hq, m, m)
    kv_keep = None if keep_k is None else keep_k[:, None, None, :]  # (B, 1, 1, S)
    kernel3 = masked_softmax(q_l @ k.transpose(-1, -2) * scale, kv_keep)  # (B, Hq, m, S)
    out = kernel1 @ (iterative_pinv(kernel2, iterations=pinv_iterations) @ (kernel3 @ v))  # (B, Hq, N, Dv)
    return out.to(in_dtype)


def reference_nystrom_attention(q, k, v, *, num_landmarks, key_padding_mask=None, scale=None):
    """Readable form with the exact pseudo-inverse (torch.linalg.pinv) and explicit segment loops."""
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    S, m = k.shape[2], num_landmarks
    keep = torch.ones(B, S, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    scale = check_scale(scale, D)
    keep_q = keep if N == S else torch.ones(B, N, dtype=torch.bool)  # self-attention: padded queries left out
    q_l = []
    for j in range(m):
        seg = slice((j * N) // m, ((j + 1) * N) // m)
        w = keep_q[:, seg].to(q.dtype)[:, None, :, None]  # (B, 1, len, 1)
        q_l.append((q[:, :, seg] * w).sum(2) / w.sum(2).clamp_min(1))
    q_l = torch.stack(q_l, 2)
    k_l, ok = [], []
    for j in range(m):
        seg = slice((j * S) // m, ((j + 1) * S) // m)
        w = keep[:, seg].to(k.dtype)[:, None, :, None]  # (B, 1, len, 1)
        k_l.append((k[:, :, seg] * w).sum(2) / w.sum(2).clamp_min(1))
        ok.append(keep[:, seg].any(1))
    k_l, ok = torch.stack(k_l, 2), torch.stack(ok, 1)[:, None, None, :]
    v = v * keep[:, None, :, None]
    kernel1 = masked_softmax(q @ k_l.transpose(-1, -2) * scale, ok)
    kernel2 = masked_softmax(q_l @ k_l.transpose(-1, -2) * scale, ok)
    kernel3 = masked_softmax(q_l @ k.transpose(-1, -2) * scale, keep[:, None, None, :])
    return kernel1 @ torch.linalg.pinv(kernel2) @ kernel3 @ v
