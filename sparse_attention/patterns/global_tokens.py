"""Global tokens: a few positions that attend everything and that everything attends.

i in G or j in G, for a set G of key-space positions (Longformer's global attention,
ETC/BigBird's global tokens).

G={0}, N=S=5::

    x x x x x
    x . . . .
    x . . . .
    x . . . .
    x . . . .
"""

from __future__ import annotations

import torch

from .._checks import check_indices
from .base import Pattern, block_position_range, num_blocks, query_positions


class Global(Pattern):
    """i in G or j in G. ``indices`` are positions in [0, S); any order, duplicates merged."""

    def __init__(self, indices):
        self.indices = check_indices("indices", indices)

    def check_lengths(self, n_q, n_k):
        if self.indices and self.indices[-1] >= n_k:
            raise ValueError(
                f"Global indices must be positions in [0, S={n_k}), got index {self.indices[-1]}"
            )

    def _is_global(self, pos: torch.Tensor) -> torch.Tensor:
        g = torch.tensor(self.indices, dtype=pos.dtype, device=pos.device)
        return torch.isin(pos, g)

    def allowed(self, q_idx, kv_idx, *, n_q, n_k, head=None):
        if not self.indices:
            return torch.zeros(torch.broadcast_shapes(q_idx.shape, kv_idx.shape), dtype=torch.bool,
                               device=q_idx.device)
        return self._is_global(query_positions(q_idx, n_q, n_k)) | self._is_global(kv_idx)

    def _candidates(self, n_q, n_k, block, device):
        QB, KB = num_blocks(n_q, block), num_blocks(n_k, block)
        g = torch.tensor(self.indices, dtype=torch.long, device=device)
        g = g[g < n_k]
        col_blocks = torch.unique(g // block)  # key blocks holding a global key
        first, last = block_position_range(n_q, n_k, block, device)
        # a query block holding a global query visits every key block
        global_row = ((g.view(1, -1) >= first.view(-1, 1)) & (g.view(1, -1) <= last.view(-1, 1))).any(-1)
        all_blocks = torch.arange(KB, device=device).expand(QB, KB)
        cols = torch.full((QB, KB), KB, dtype=torch.long, device=device)
        cols[:, : col_blocks.numel()] = col_blocks
        out = torch.where(global_row.view(-1, 1), all_blocks, cols)
        keep = KB if bool(global_row.any()) else col_blocks.numel()
        return out[:, :keep].unsqueeze(0).contiguous()
