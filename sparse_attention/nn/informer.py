"""Informer encoder (Zhou et al., 2021, arXiv:2012.07436): ProbSparse self-attention with distilling.

Each layer is a post-norm Transformer encoder layer whose self-attention is ProbSparse;
between layers a distilling step halves the length:
Conv1d(d_model, d_model, 3, circular padding) -> BatchNorm1d -> ELU -> MaxPool1d(3, stride 2, padding 1),
as in the paper (section 3.3 and the official code). Input and output are (B, L, E)
(batch first); the output length is ceil-halved once per distilling step.
"""

from __future__ import annotations

import torch

from .._checks import check_int
from ..dynamic.probsparse import ProbSparse
from .multihead import MultiheadAttention


class DistillingLayer(torch.nn.Module):
    """(B, L, E) -> (B, ceil(L / 2), E): Conv1d + BatchNorm1d + ELU + max-pool with stride 2."""

    def __init__(self, d_model: int):
        super().__init__()
        self.conv = torch.nn.Conv1d(d_model, d_model, kernel_size=3, padding=1, padding_mode="circular")
        self.norm = torch.nn.BatchNorm1d(d_model)
        self.pool = torch.nn.MaxPool1d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.elu(self.norm(self.conv(x.transpose(1, 2))))
        return self.pool(y).transpose(1, 2)


class InformerEncoderLayer(torch.nn.Module):
    """Post-norm encoder layer with ProbSparse self-attention. (B, L, E) -> (B, L, E)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, *,
                 factor: float = 5.0, seed: int = 0):
        super().__init__()
        self.attn = MultiheadAttention(d_model, nhead, attention=ProbSparse(factor, seed=seed), dropout=dropout)
        self.ff = torch.nn.Sequential(torch.nn.Linear(d_model, dim_feedforward), torch.nn.GELU(),
                                      torch.nn.Dropout(dropout), torch.nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.ff(x)))


class InformerEncoder(torch.nn.Module):
    """A stack of ``num_layers`` ProbSparse layers with a distilling step between consecutive layers.

    Args: d_model (E), nhead, num_layers, dim_feedforward, dropout, factor (ProbSparse c),
    distil (default True). forward(x (B, L, E)) -> (B, L', E) with L' = L halved
    (rounding up) num_layers - 1 times when distilling.
    """

    def __init__(self, d_model: int, nhead: int, num_layers: int = 2, dim_feedforward: int = 2048,
                 dropout: float = 0.1, *, factor: float = 5.0, distil: bool = True):
        super().__init__()
        num_layers = check_int("num_layers", num_layers, minimum=1)
        self.layers = torch.nn.ModuleList(
            InformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, factor=factor, seed=i)
            for i in range(num_layers))
        self.distil = torch.nn.ModuleList(DistillingLayer(d_model) for _ in range(num_layers - 1)) if distil else None
        self.norm = torch.nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.distil is not None and i < len(self.distil):
                x = self.distil[i](x)
        return self.norm(x)
