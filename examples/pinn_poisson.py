"""A physics-informed network for the 1-D Poisson equation, trained through autojac's Laplacian.

    u''(x) = g(x) on (0, 1),   u(0) = u(1) = 0,   g(x) = -pi^2 sin(pi x)   (solution: u = sin(pi x))

The loss needs the second derivative of the network at every collocation point, and training
needs gradients *through* it: `autojac.laplacian(model, x, create_graph=True)`. The first call
tunes (timing each strategy together with a backward pass, which is what a training step pays);
later calls dispatch straight to the winner, whatever the weights are by then.

    python examples/pinn_poisson.py [--steps 500] [--points 128]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

import autojac


def source(x: Tensor) -> Tensor:
    return -math.pi ** 2 * torch.sin(math.pi * x)


def solution(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x)


def make_model(width: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def loss_of(model: nn.Module, x: Tensor, boundary: Tensor) -> Tensor:
    """Mean squared PDE residual u'' - g at the collocation points x (B, 1), plus the boundary misfit."""
    u_xx = autojac.laplacian(model, x, create_graph=True)  # (B, 1): d^2 u / dx^2 per point
    residual = u_xx - source(x)
    return residual.square().mean() + 10 * model(boundary).square().mean()


def max_error(model: nn.Module, points: int = 201) -> float:
    x = torch.linspace(0, 1, points)[:, None]
    with torch.no_grad():
        return float((model(x) - solution(x)).abs().max())


def train(steps: int = 500, points: int = 128, lr: float = 5e-3, seed: int = 0,
          log: Callable[[str], None] | None = None, log_every: int = 100) -> tuple[nn.Module, list[float]]:
    """Train a fresh network for `steps` Adam steps; returns it and the loss at every step."""
    torch.manual_seed(seed)
    model = make_model()
    x = torch.linspace(0, 1, points)[:, None]
    boundary = torch.tensor([[0.0], [1.0]])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = loss_of(model, x, boundary)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {losses[-1]:.4e}")
    return model, losses


def main() -> None:
    parser = argparse.ArgumentParser(description="1-D Poisson PINN trained with autojac.laplacian")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--points", type=int, default=128)
    args = parser.parse_args()
    model, losses = train(args.steps, args.points, log=print)
    x = torch.linspace(0, 1, args.points)[:, None]
    print(autojac.explain(model, x, op="laplacian", create_graph=True).summary())
    print(f"loss {losses[0]:.3e} -> {losses[-1]:.3e}; max |u - sin(pi x)| = {max_error(model):.3e}")


if __name__ == "__main__":
    main()
