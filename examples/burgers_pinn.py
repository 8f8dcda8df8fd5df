"""A physics-informed network for the 1-D viscous Burgers equation, trained through
`autojac.derivatives`.

    u_t + u u_x = nu u_xx   on x in [-1, 1], t in [0, 1],   nu = 0.01 / pi
    u(x, 0) = -sin(pi x),   u(-1, t) = u(1, t) = 0

The network u maps a point xt = (x, t) to u. The residual needs u, u_x, u_t and u_xx at every
collocation point, and training needs gradients through them (create_graph=True). One call
gives them all:

    d = autojac.derivatives(u, xt, ops=("value", "jacobian", "hessian_diag"), create_graph=True)
    u, (u_x, u_t), u_xx = d.value[:, 0], d.jacobian[:, 0].unbind(1), d.hessian_diag[:, 0, 0]

It also computes u_tt, which the equation does not need. With `dims` per quantity the second
derivative is restricted to space, in the same call:

    d = autojac.derivatives(u, xt, ops=("value", "jacobian", "hessian_diag"), dims={"hessian_diag": [0]},
                            create_graph=True)

The script trains with the first form, then times a training step of each form, interleaved on
the same model, against the nested autograd a DeepXDE or hand-written PINN does: one
`torch.autograd.grad(u.sum(), xt, create_graph=True)` for (u_x, u_t), then one more for u_xx.

    python examples/burgers_pinn.py [--steps 1000] [--points 2048] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import autojac

NU = 0.01 / math.pi

Residual = Callable[[nn.Module, Tensor], Tensor]  # (u, xt (B, 2)) -> u_t + u u_x - nu u_xx (B,)


def make_model(width: int = 32, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(2, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def residual_autojac(u: nn.Module, xt: Tensor) -> Tensor:
    """One call: u, its gradient (u_x, u_t) and the pure second derivatives (u_xx, u_tt)."""
    d = autojac.derivatives(u, xt, ops=("value", "jacobian", "hessian_diag"), create_graph=True)
    value, (u_x, u_t), u_xx = d.value[:, 0], d.jacobian[:, 0].unbind(1), d.hessian_diag[:, 0, 0]
    return u_t + value * u_x - NU * u_xx


def residual_autojac_dims(u: nn.Module, xt: Tensor) -> Tensor:
    """dims per quantity: the Jacobian over (x, t), the second derivative over x alone (no u_tt)."""
    d = autojac.derivatives(u, xt, ops=("value", "jacobian", "hessian_diag"), dims={"hessian_diag": [0]},
                            create_graph=True)
    value, (u_x, u_t), u_xx = d.value[:, 0], d.jacobian[:, 0].unbind(1), d.hessian_diag[:, 0, 0]
    return u_t + value * u_x - NU * u_xx


def residual_nested(u: nn.Module, xt: Tensor) -> Tensor:
    """What a DeepXDE user gets from dde.grad.jacobian(u, xt, i=0, j=...) and
    dde.grad.hessian(u, xt, i=0, j=0): nested torch.autograd.grad."""
    xt = xt.detach().requires_grad_()
    value = u(xt)[:, 0]
    (grad,) = torch.autograd.grad(value.sum(), xt, create_graph=True)
    u_x, u_t = grad[:, 0], grad[:, 1]
    (grad_x,) = torch.autograd.grad(u_x.sum(), xt, create_graph=True)
    return u_t + value * u_x - NU * grad_x[:, 0]


RESIDUALS: dict[str, Residual] = {
    "autojac derivatives": residual_autojac,
    "autojac dims={hessian_diag: [0]}": residual_autojac_dims,
    "nested autograd": residual_nested,
}


class Points:
    """Fixed training points: collocation inside (B, 2), the initial line t = 0, the walls x = +-1."""

    def __init__(self, collocation: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inside = torch.rand(collocation, 2, generator=generator) * torch.tensor([2.0, 1.0]) - torch.tensor(
            [1.0, 0.0])
        x0 = torch.linspace(-1, 1, 256)
        self.initial = torch.stack([x0, torch.zeros_like(x0)], 1)
        self.initial_u = -torch.sin(math.pi * x0)
        t_wall = torch.rand(128, generator=generator)
        self.walls = torch.stack([torch.where(torch.arange(128) % 2 == 0, -1.0, 1.0), t_wall], 1)


def loss_of(u: nn.Module, points: Points, residual: Residual = residual_autojac) -> Tensor:
    """Mean squared PDE residual at the collocation points, plus the initial and boundary misfits."""
    pde = residual(u, points.inside).square().mean()
    initial = (u(points.initial)[:, 0] - points.initial_u).square().mean()
    walls = u(points.walls).square().mean()
    return pde + initial + walls


def train(steps: int = 1000, points: int = 2048, lr: float = 5e-3, seed: int = 0,
          residual: str = "autojac derivatives", log: Callable[[str], None] | None = None,
          log_every: int = 100) -> tuple[nn.Module, list[float]]:
    """Train a fresh network for `steps` Adam steps; returns it and the loss at every step."""
    torch.manual_seed(seed)
    model = make_model()
    data = Points(points, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = loss_of(model, data, RESIDUALS[residual])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {losses[-1]:.4e}")
    return model, losses


def time_steps(model: nn.Module, points: int = 2048, rounds: int = 20,
               names: tuple[str, ...] = tuple(RESIDUALS)) -> dict[str, float]:
    """Median seconds per training step (loss, backward, Adam step) of each residual, on the same
    model and points, interleaved round by round (the order rotating). The first step of each,
    which tunes autojac, is not timed."""
    data = Points(points, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step(residual: Residual) -> None:
        loss = loss_of(model, data, residual)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for name in names:
        step(RESIDUALS[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            step(RESIDUALS[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> tuple[list[float], dict[str, float]]:
    parser = argparse.ArgumentParser(description="1-D viscous Burgers PINN trained with autojac.derivatives")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--points", type=int, default=2048, help="collocation points")
    parser.add_argument("--rounds", type=int, default=20, help="timed training steps per form")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="a few small steps and rounds, for a smoke test")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.points, args.rounds = 80, 256, 3

    model, losses = train(args.steps, args.points, log=print)
    print(f"loss {losses[0]:.3e} -> {losses[-1]:.3e}")
    inside = Points(args.points).inside
    print(autojac.explain(model, inside, op="derivatives", ops=("value", "jacobian", "hessian_diag"),
                          create_graph=True).summary())

    seconds = time_steps(model, args.points, args.rounds)
    print(f"\ntime per training step, {args.points} collocation points, u: R^2 -> R (MLP 3 x 32 tanh); "
          f"median of {args.rounds}, interleaved")
    base = seconds["nested autograd"]
    for name, s in seconds.items():
        print(f"  {name:24s} {s * 1e3:8.2f} ms   x{s / base:.2f} of nested autograd")
    return losses, seconds


if __name__ == "__main__":
    main()
