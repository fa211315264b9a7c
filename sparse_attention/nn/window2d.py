"""Swin-style window attention over 2-D feature maps.

Liu et al., 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", arXiv:2103.14030. The map is cut into non-overlapping Wh×Ww windows; tokens
attend only inside their window, with a learned relative position bias (a table of
(2Wh-1)(2Ww-1) entries per head). A shifted layer first rolls the map by (-sh, -sw) so
that windows straddle the previous layer's borders; tokens that the roll brought from the
opposite edge must not attend the others in their window. In the rolled frame the rows
split into three regions (same for columns), W = window, s = shift, Hp = padded height::

    rows [0, Hp-W)        ordinary windows
    rows [Hp-W, Hp-s)     last window, rows that did not wrap
    rows [Hp-s, Hp)       last window, rows that wrapped around from the top

and a token attends a key only if both fall in the same row region and column region.

Odd sizes: the map is zero-padded at the bottom/right to multiples of the window and the
padding is cropped from the output. Unlike the reference Swin code (which lets real tokens
attend the zero padding), padded positions are **never attended**: results at real positions
do not depend on how much padding a size needs. A query whose window region holds no real
key (possible only at padded positions) gets 0, and is cropped anyway.

``reference_window_attention_2d`` below is the readable loop-over-windows version the
fast path is tested against.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .._checks import check_bool, check_dropout, check_int, check_layer_input_dtype, check_scale
from ..reference import masked_softmax


def _pair(name: str, value: object, *, minimum: int) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (check_int(f"{name}[0]", value[0], minimum=minimum), check_int(f"{name}[1]", value[1], minimum=minimum))


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """(Wh·Ww, Wh·Ww) int64: the bias-table row of each (query, key) pair of a window.

    Row of (dy, dx) = (yq - yk, xq - xk) is (dy + Wh - 1) * (2Ww - 1) + (dx + Ww - 1).
    """
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    y, x = ys.flatten(), xs.flatten()  # (N,) with N = Wh*Ww, row-major
    dy = y[:, None] - y[None, :] + wh - 1  # (N, N) in [0, 2Wh-2]
    dx = x[:, None] - x[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def _shift_regions(size: int, window: int, shift: int) -> torch.Tensor:
    """(size,) region id of each row (or column) of the rolled, padded map (see module docstring)."""
    region = torch.zeros(size, dtype=torch.long)
    if shift > 0:
        region[size - window:size - shift] = 1
        region[size - shift:] = 2
    return region


def _to_windows(t: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, Hp, Wp, ...) -> (B, nW, Wh*Ww, ...), windows in row-major order."""
    B, Hp, Wp = t.shape[:3]
    rest = t.shape[3:]
    t = t.reshape(B, Hp // wh, wh, Wp // ww, ww, *rest).transpose(2, 3)  # (B, Hp/Wh, Wp/Ww, Wh, Ww, ...)
    return t.reshape(B, (Hp // wh) * (Wp // ww), wh * ww, *rest)


def _from_windows(t: torch.Tensor, Hp: int, Wp: int, wh: int, ww: int) -> torch.Tensor:
    """(B, nW, Wh*Ww, C) -> (B, Hp, Wp, C)."""
    B, C = t.shape[0], t.shape[-1]
    t = t.reshape(B, Hp // wh, Wp // ww, wh, ww, C).transpose(2, 3)  # (B, Hp/Wh, Wh, Wp/Ww, Ww, C)
    return t.reshape(B, Hp, Wp, C)


class WindowAttention2d(torch.nn.Module):
    """Multi-head self-attention inside (shifted) windows of a (B, H, W, C) map.

    Args:
        dim: C, channels.
        num_heads: heads; C must be divisible by it (head dim D = C // heads).
        window_size: Wh = Ww = int, or (Wh, Ww).
        shift_size: 0 (default, plain windows) or the roll (sh, sw), each in [0, window).
        qkv_bias: bias on the qkv projection. Default True.
        attn_drop: dropout on the attention weights (training only). Default 0.
        proj_drop: dropout on the output (training only). Default 0.
        scale: multiplier of q.k; default None = 1/sqrt(D).

    Parameters and buffers use Swin's names: ``qkv``, ``proj``,
    ``relative_position_bias_table`` ((2Wh-1)(2Ww-1), heads), ``relative_position_index``.

    forward(x) -> (B, H, W, C): x (B, H, W, C); any H, W >= 1 (padded internally, padding
    never attended, see the module docstring).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | tuple[int, int],
                 shift_size: int | tuple[int, int] = 0, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, scale: float | None = None):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.window_size = _pair("window_size", window_size, minimum=1)
        self.shift_size = _pair("shift_size", shift_size, minimum=0)
        for axis in range(2):
            if self.shift_size[axis] >= self.window_size[axis]:
                raise ValueError(f"shift_size must be smaller than window_size on each axis, got "
                                 f"shift_size={self.shift_size}, window_size={self.window_size}")
        head_dim = dim // num_heads
        self.scale = check_scale(scale, head_dim)  # None: 1/sqrt(D), as everywhere
        self.attn_drop = check_dropout(attn_drop, "attn_drop")
        self.proj_drop = check_dropout(proj_drop, "proj_drop")
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        wh, ww = self.window_size
        self.relative_position_bias_table = torch.nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        torch.nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(wh, ww))
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")

    def _check(self, x: object) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, H, W, C={self.dim}), got {got}")
        if x.shape[1] == 0 or x.shape[2] == 0:
            raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
        check_layer_input_dtype("x", x, self.qkv.weight.dtype)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, Wh·Ww, Wh·Ww) bias added to the scores of every window."""
        n = self.window_size[0] * self.window_size[1]
        return self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(n, n, -1
                                                                                                 ).permute(2, 0, 1)

    def window_mask(self, H: int, W: int, device: torch.device | None = None) -> torch.Tensor:
        """(nW, Wh·Ww, Wh·Ww) bool, True = may attend, for an H×W map (rolled frame, padding excluded)."""
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        valid = torch.zeros(Hp, Wp, dtype=torch.bool)
        valid[:H, :W] = True
        valid = torch.roll(valid, shifts=(-sh, -sw), dims=(0, 1))  # (Hp, Wp) in the rolled frame
        region = _shift_regions(Hp, wh, sh)[:, None] * 3 + _shift_regions(Wp, ww, sw)[None, :]  # (Hp, Wp)
        region_w = _to_windows(region[None], wh, ww)[0]  # (nW, N)
        valid_w = _to_windows(valid[None], wh, ww)[0]
        allowed = (region_w[:, :, None] == region_w[:, None, :]) & valid_w[:, None, :]  # (nW, N, N)
        return allowed.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        B, H, W, C = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        nh = self.num_heads
        x = F.pad(x, (0, 0, 0, (-W) % ww, 0, (-H) % wh))  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1:3]
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        xw = _to_windows(x, wh, ww)  # (B, nW, N, C)
        nW, N = xw.shape[1:3]
        qkv = self.qkv(xw).reshape(B, nW, N, 3, nh, C // nh).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, nh, N, D)
        q, k, v = qkv.unbind(0)
        scores = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (B, nW, nh, N, N)
        scores = scores + self.relative_position_bias()[None, None].to(scores.dtype)
        allowed = self.window_mask(H, W, device=x.device)[None, :, None]  # (1, nW, 1, N, N)
        p = masked_softmax(scores, allowed)
        if self.training and self.attn_drop:
            p = F.dropout(p, self.attn_drop)
        out = torch.matmul(p, v).transpose(2, 3).reshape(B, nW, N, C)  # (B, nW, N, C)
        out = _from_windows(out, Hp, Wp, wh, ww)  # (B, Hp, Wp, C)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        out = self.proj(out[:, :H, :W])
        if self.training and self.proj_drop:
            out = F.dropout(out, self.proj_drop)
        return out


def reference_window_attention_2d(module: WindowAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The readable version of ``module(x)`` (eval mode, no dropout): loops over images and windows.

    Each window is read directly from the unrolled map: the token at rolled coordinates
    (i, j) is the original (padded) position ((i + sh) mod Hp, (j + sw) mod Wp). Two tokens
    of a window may attend each other when, on each axis, both or neither wrapped around
    the edge, and the key is inside the real (unpadded) map.

    x: (B, H, W, C) -> (B, H, W, C).
    """
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = module.window_size, module.shift_size
    nh, D = module.num_heads, C // module.num_heads
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    padded = x.new_zeros(B, Hp, Wp, C)
    padded[:, :H, :W] = x
    q, k, v = module.qkv(padded).split(C, dim=-1)  # each (B, Hp, Wp, C)
    table = module.relative_position_bias_table
    out = x.new_zeros(B, Hp, Wp, C)
    for b in range(B):
        for top in range(0, Hp, wh):
            for left in range(0, Wp, ww):
                cells = [(i, j) for i in range(top, top + wh) for j in range(left, left + ww)]  # rolled frame
                orig = [((i + sh) % Hp, (j + sw) % Wp) for i, j in cells]
                n = len(cells)
                allowed = torch.zeros(n, n, dtype=torch.bool)
                bias_rows = torch.zeros(n, n, dtype=torch.long)
                for a, (ia, ja) in enumerate(cells):
                    for c, (ic, jc) in enumerate(cells):
                        same_rows = (ia >= Hp - sh) == (ic >= Hp - sh)
                        same_cols = (ja >= Wp - sw) == (jc >= Wp - sw)
                        inside = orig[c][0] < H and orig[c][1] < W
                        allowed[a, c] = same_rows and same_cols and inside
                        bias_rows[a, c] = (ia - ic + wh - 1) * (2 * ww - 1) + (ja - jc + ww - 1)
                rows = torch.tensor([o[0] for o in orig])
                cols = torch.tensor([o[1] for o in orig])
                for h in range(nh):
                    sl = slice(h * D, (h + 1) * D)
                    qw, kw, vw = q[b, rows, cols, sl], k[b, rows, cols, sl], v[b, rows, cols, sl]  # (n, D)
                    scores = qw @ kw.T * module.scale + table[bias_rows, h]
                    scores = scores.masked_fill(~allowed, float("-inf"))
                    weights = torch.softmax(scores, dim=-1)
                    weights = torch.nan_to_num(weights, nan=0.0)  # a row with no real key -> 0
                    out[b, rows, cols, sl] = weights @ vw
    return module.proj(out[:, :H, :W])
