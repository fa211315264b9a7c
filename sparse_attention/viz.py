"""Pictures of attention patterns: the N x S matrix, one panel per head where heads differ.

Each cell of the matrix is drawn as an exact square of pixels (no resampling), so a
picture can be read back cell by cell; block boundaries are drawn as thin grey lines on
the first pixel row/column of each block, never over a cell's centre. Needs matplotlib
(the ``viz`` extra).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch

from ._checks import check_int

ALLOWED_RGB = (0.12, 0.25, 0.60)  # dark blue: may attend
EMPTY_RGB = (1.0, 1.0, 1.0)
GRID_RGB = (0.72, 0.72, 0.72)  # block boundaries over empty cells
GRID_ALLOWED_RGB = (0.50, 0.60, 0.85)  # block boundaries over allowed cells
MARGIN = 40  # pixels around each panel (room for titles)
MAX_CELLS = 1024  # matrices longer than this are pooled to at most this many pixels a side (pool_any)
TITLE_PX = 48


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "pictures need matplotlib: pip install 'sparse-attention[viz]' (or pip install matplotlib)"
        ) from e
    return plt


@dataclass(frozen=True)
class Geometry:
    """Where panel h's cell (i, j) lies in the saved picture (pixels from the top-left)."""

    cell: int  # pixels per cell side
    origins: tuple[tuple[int, int], ...]  # (x0, y0) of each panel's top-left cell
    width: int
    height: int

    def center(self, head: int, i: int, j: int) -> tuple[int, int]:
        """(row, column) pixel at the centre of cell (query i, key j) of panel ``head``."""
        x0, y0 = self.origins[head]
        return y0 + i * self.cell + self.cell // 2, x0 + j * self.cell + self.cell // 2


def geometry(num_panels: int, n_q: int, n_k: int) -> Geometry:
    """Layout of ``render_masks``'s picture for this many (N, S) panels."""
    cell = cell_size(n_q, n_k)
    pw, ph = n_k * cell, n_q * cell
    origins = tuple((MARGIN + h * (pw + MARGIN), TITLE_PX + MARGIN) for h in range(num_panels))
    return Geometry(cell, origins, num_panels * (pw + MARGIN) + MARGIN, ph + 2 * MARGIN + TITLE_PX)


def cell_size(n_q: int, n_k: int) -> int:
    """Pixels per cell: matrices of any size come out between ~256 and ~1024 pixels wide."""
    return max(1, min(16, 768 // max(n_q, n_k, 1)))


def pool_factor(n: int) -> int:
    """Pairs per pixel side for a matrix of n rows or columns: 1 up to MAX_CELLS, else enough to fit it."""
    return max(1, -(-n // MAX_CELLS))


def pool_any(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """(H, N, S) bool -> (H, ceil(N/factor), ceil(S/factor)): a cell is True when any pair of its factor × factor
    tile is (the tiles at the far edges may be cut short)."""
    if factor == 1:
        return masks
    H, n_q, n_k = masks.shape
    rows, cols = -(-n_q // factor), -(-n_k // factor)
    padded = torch.zeros(H, rows * factor, cols * factor, dtype=torch.bool, device=masks.device)
    padded[:, :n_q, :n_k] = masks
    return padded.view(H, rows, factor, cols, factor).any(4).any(2)


def panel_image(mask: torch.Tensor, cell: int, block: int | None) -> torch.Tensor:
    """(N, S) bool -> (N*cell, S*cell, 3) float RGB image with the block grid."""
    n_q, n_k = mask.shape
    allowed = torch.tensor(ALLOWED_RGB)
    empty = torch.tensor(EMPTY_RGB)
    img = torch.where(mask.unsqueeze(-1), allowed, empty)  # (N, S, 3)
    img = img.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    if block and cell >= 3:  # grid on the first pixel row/column of each block
        grid, grid_on = torch.tensor(GRID_RGB), torch.tensor(GRID_ALLOWED_RGB)
        for r in range(block, n_q, block):
            img[r * cell, :] = torch.where(mask[r].repeat_interleave(cell).unsqueeze(-1), grid_on, grid)
        for c in range(block, n_k, block):
            img[:, c * cell] = torch.where(mask[:, c].repeat_interleave(cell).unsqueeze(-1), grid_on, grid)
    return img


def render_masks(masks: torch.Tensor, path: str, *, title: str, panel_titles: list[str] | None = None,
                 block: int | None = None, dpi: int = 100) -> Geometry:
    """Save (H, N, S) bool masks side by side to ``path`` (.png or .svg); returns the geometry.
    ``panel_titles``: one per mask, or None; ``block``: grid spacing (>= 1), or None."""
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.dtype != torch.bool:
        got = f"{masks.dtype} tensor of shape {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else \
            type(masks).__name__
        raise TypeError(f"masks must be a bool tensor (H, N, S), got {got}")
    if panel_titles is not None and len(panel_titles) != masks.shape[0]:
        raise ValueError(f"panel_titles must hold one title per mask ({masks.shape[0]}), got {len(panel_titles)}")
    if block is not None:
        check_int("block", block, minimum=1)
    plt = require_matplotlib()
    H, n_q, n_k = masks.shape
    geo = geometry(H, n_q, n_k)
    cell, width, height = geo.cell, geo.width, geo.height
    pw, ph = n_k * cell, n_q * cell
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    chars = max(40, int(width / 9))  # ~7-9 px per character at this font size
    fig.text(0.5, 1 - 8 / height, textwrap.fill(title, chars), ha="center", va="top", fontsize=10)
    for h, (x0, y0) in enumerate(geo.origins):
        # figimage counts y from the bottom of the figure
        fig.figimage(panel_image(masks[h], cell, block).numpy(), xo=x0, yo=height - y0 - ph, origin="upper")
        if panel_titles:
            fig.text((x0 + pw / 2) / width, 1 - (y0 - 10) / height, panel_titles[h], ha="center", va="bottom",
                     fontsize=9)
        fig.text((x0 + pw / 2) / width, (height - y0 - ph - 14) / height, "key j", ha="center", fontsize=8)
    fig.text(8 / width, 1 - (TITLE_PX + MARGIN + ph / 2) / height, "query i", rotation=90, va="center", fontsize=8)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return geo
