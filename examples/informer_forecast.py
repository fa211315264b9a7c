"""Forecast a generated seasonal series with an Informer encoder (ProbSparse attention + distilling).

    python examples/informer_forecast.py [--steps 300] [--seed 0]

The series is generated (no download): two seasonal sines with a slow trend and noise.
Windows of 96 steps predict the next 24. The script trains for a few hundred steps on
a CPU and prints the test MSE next to two naive baselines (repeat the last value;
repeat the last season), so you can see the model learned the seasonality.
"""

from __future__ import annotations

import argparse
import math

import torch

import sparse_attention as sa

CONTEXT, HORIZON = 96, 24


def make_series(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float32)
    return (torch.sin(2 * math.pi * t / 24) + 0.5 * torch.sin(2 * math.pi * t / 168) + 0.002 * t
            + 0.1 * torch.randn(n, generator=g))


def windows(series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(len(series) - CONTEXT - HORIZON + 1)
    x = torch.stack([series[i: i + CONTEXT] for i in idx.tolist()])
    y = torch.stack([series[i + CONTEXT: i + CONTEXT + HORIZON] for i in idx.tolist()])
    return x, y


class Forecaster(torch.nn.Module):
    def __init__(self, d_model: int = 32, nhead: int = 4, num_layers: int = 2):
        super().__init__()
        self.embed = torch.nn.Linear(1, d_model)
        self.pos = torch.nn.Parameter(torch.randn(CONTEXT, d_model) * 0.02)
        self.encoder = sa.nn.InformerEncoder(d_model, nhead, num_layers, dim_feedforward=64, dropout=0.0, factor=3)
        out_len = CONTEXT
        for _ in range(num_layers - 1):
            out_len = math.ceil(out_len / 2)
        self.head = torch.nn.Linear(out_len * d_model, HORIZON)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, CONTEXT) -> (B, HORIZON)
        mean = x.mean(1, keepdim=True)
        h = self.encoder(self.embed((x - mean).unsqueeze(-1)) + self.pos)
        return self.head(h.flatten(1)) + mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    series = make_series(3000, args.seed)
    split = 2400
    x_train, y_train = windows(series[:split])
    x_test, y_test = windows(series[split - CONTEXT:])
    model = Forecaster()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        batch = torch.randint(len(x_train), (32,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x_train[batch]), y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train mse {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(model(x_test), y_test).item()
    last = torch.nn.functional.mse_loss(x_test[:, -1:].expand_as(y_test), y_test).item()
    season = torch.nn.functional.mse_loss(x_test[:, -24:], y_test).item()
    print(f"test mse: informer {mse:.4f} | repeat last value {last:.4f} | repeat last day {season:.4f}")


if __name__ == "__main__":
    main()
