"""Argument validation shared by every entry point.

Everything here runs in the Python front end, before any backend is chosen, so a
bad call fails the same way on every backend (RELIABILITY.md, rule 0).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an int, or raise naming ``name`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_seed(value: object) -> int:
    """A seed torch.Generator.manual_seed takes: an int in [-2**63, 2**64 - 1]."""
    return check_int("seed", value, minimum=-(2**63), maximum=2**64 - 1)


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise TypeError naming ``name`` (0/1 are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_indices(name: str, values: Iterable[object]) -> tuple[int, ...]:
    """A sorted tuple of distinct non-negative ints, from any iterable of ints or a 1-D int tensor."""
    if isinstance(values, torch.Tensor):
        if values.dim() > 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {values!r}")
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    out = sorted({check_int(f"{name}[{i}]", v, minimum=0) for i, v in enumerate(values)})
    return tuple(out)


def check_qkv(q: object, k: object, v: object) -> tuple[int, int, int, int, int, int, int]:
    """Validate q (B, Hq, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv).

    Returns (B, Hq, Hkv, N, S, D, Dv).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    B, Hq, N, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: q.shape[0]={B}, k.shape[0]={k.shape[0]}, v.shape[0]={v.shape[0]}"
        )
    Hkv, S = k.shape[1], k.shape[2]
    if v.shape[1] != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got k.shape[1]={Hkv}, v.shape[1]={v.shape[1]}")
    if v.shape[2] != S:
        raise ValueError(f"k and v must have the same length, got k.shape[2]={S}, v.shape[2]={v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must have the same head dim, got q.shape[-1]={D}, k.shape[-1]={k.shape[3]}")
    if Hkv == 0 and Hq != 0:
        raise ValueError(f"k and v have no heads (k.shape[1]=0) while q has {Hq}: each query head reads a "
                         "key/value head")
    if Hkv != 0 and Hq % Hkv != 0:  # (no heads on either side, as in SDPA: an empty output)
        raise ValueError(
            f"the number of query heads must be a multiple of the key/value heads, got Hq={Hq}, Hkv={Hkv}"
        )
    if D == 0:
        raise ValueError(f"head dim must be positive, got q.shape[-1]={D}")
    return B, Hq, Hkv, N, S, D, v.shape[3]


def check_key_padding_mask(mask: object, B: int, S: int, device: torch.device) -> torch.Tensor | None:
    """key_padding_mask is (B, S) bool, True = padding (ignored key)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape (B, S), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}; "
            "convert with `mask.bool()` if it holds 0/1"
        )
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q/k/v are on {device}")
    return mask


def check_scale(scale: object, D: int) -> float:
    """scale=None means 1/sqrt(D)."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_dropout(p: object, name: str = "dropout_p") -> float:
    """A dropout probability in [0, 1], as a float; errors name the argument ``name``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a dropout probability (a float in [0, 1]), got {p!r}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a dropout probability in [0, 1], got {p}")
    return p


def check_positive_real(name: str, value: object) -> float:
    """A positive finite real number (an epsilon, a temperature), as a float; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive finite real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite real number, got {value!r}")
    return value


def check_float_dtype(name: str, value: object) -> torch.dtype:
    """One of the floating dtypes attention runs in (float16/bfloat16/float32/float64)."""
    if not isinstance(value, torch.dtype) or value not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of torch.float16, torch.bfloat16, torch.float32, torch.float64, "
                        f"got {value!r}")
    return value


def first_order(backward):
    """For the backward of an autograd Function that is not itself differentiable (a native or fused kernel),
    in place of ``once_differentiable``: with that, a second derivative through it came out None (or "not
    used in the graph"). Grad mode is on inside a backward only when a graph of it was asked for
    (create_graph=True): then this raises."""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{type(ctx).__name__.removesuffix('Backward')}: second-order gradients are not "
                               "supported (the backward is not differentiable); compute them through "
                               "sa.reference_attention instead")
        return backward(ctx, *grads)
    return checked


def check_layer_input_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """A layer's input: a floating tensor in the dtype of the layer's parameters (its Linear would raise
    "mat1 and mat2 must have the same dtype"), or any floating dtype under autocast, which casts it."""
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dtype != dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{name} must have the dtype of the layer's parameters ({dtype}), got {t.dtype}; "
                        "convert the input or the layer (.to(dtype))")
