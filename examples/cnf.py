"""A continuous normalizing flow (FFJORD-style) on 2-D data, trained with torchdiffeq and
`autojac.divergence`.

A velocity field f(z, t) moves the data x at t = 0 to z(1), which should look like a standard
normal sample. Along the way the log-density changes by minus the divergence (the trace of the
Jacobian of f):

    dz/dt = f(z, t),   d delta/dt = -div f(z, t),   log p(x) = log N(z(1); 0, I) - delta(1)

Training maximizes log p(x), so the divergence must be differentiable (create_graph=True). The
ODE time t reaches f as a per-call argument, `autojac.divergence(f, z, args=(t,))`: it is not
part of the plan's key, so the plan is tuned once, not at every solver stage. `has_aux=True`
hands f's value back from the same forward pass, so dz/dt costs no extra pass.

After training, the script times a training step with the same model, interleaved, against the
two ways FFJORD computes the divergence: `divergence_bf` (the exact trace by one autograd.grad
per dimension) and `divergence_approx` (Hutchinson's estimate by one vector-Jacobian product
with a probe drawn per solve), both written here by hand, and autojac's own Hutchinson estimate.

    pip install -e ".[examples]"     # torchdiffeq
    python examples/cnf.py [--steps 300] [--batch 512] [--data moons|gaussians] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

import autojac

# --- data -----------------------------------------------------------------------------------------


def two_moons(n: int, generator: torch.Generator, noise: float = 0.08) -> Tensor:
    """(n, 2): two interleaved half circles, centred and scaled to about unit variance."""
    angle = torch.rand(n, generator=generator) * math.pi
    lower = torch.rand(n, generator=generator) < 0.5
    x = torch.where(lower, 1 - torch.cos(angle), torch.cos(angle))
    y = torch.where(lower, 0.5 - torch.sin(angle), torch.sin(angle))
    points = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator)
    return (points - torch.tensor([0.5, 0.25])) * torch.tensor([1.2, 2.0])


def eight_gaussians(n: int, generator: torch.Generator, noise: float = 0.1) -> Tensor:
    """(n, 2): eight small Gaussians on a circle of radius 2."""
    angle = torch.randint(0, 8, (n,), generator=generator) * (math.pi / 4)
    centres = 2 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return centres + noise * torch.randn(n, 2, generator=generator)


DATA = {"moons": two_moons, "gaussians": eight_gaussians}

# --- the model ------------------------------------------------------------------------------------


class Velocity(nn.Module):
    """The vector field f(z, t): z (B, 2) and the ODE time t (a 0-dim tensor) -> (B, 2)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 2))

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([z, t.expand(z.shape[0], 1)], 1))


Divergence = Callable[["Flow", Tensor, Tensor], tuple[Tensor, Tensor]]  # (flow, z, t) -> (dz/dt, div)


def value_and_field(velocity: Velocity) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """f returning (f(z, t), f(z, t)): with has_aux=True autojac hands the value back."""

    def both(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        y = velocity(z, t)
        return y, y

    return both


def divergence_autojac(flow: Flow, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Exact, by whichever strategy autojac measured fastest for this model and batch."""
    div, dz = autojac.divergence(flow.both, z, args=(t,), has_aux=True, create_graph=True)
    return dz, div


def divergence_autojac_hutchinson(flow: Flow, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """autojac's Hutchinson estimate, one Rademacher probe, the same probe for a whole solve."""
    generator = torch.Generator(device=z.device).manual_seed(flow.probe_seed)
    div, dz = autojac.divergence(flow.both, z, args=(t,), has_aux=True, estimator="hutchinson", samples=1,
                                 generator=generator, create_graph=True)
    return dz, div


def _differentiable(z: Tensor) -> Tensor:
    # the state at t = 0 is the data, which autograd does not track yet
    return z if z.requires_grad else z.detach().requires_grad_()


def divergence_brute_force(flow: Flow, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """FFJORD's divergence_bf: the exact trace, one autograd.grad per dimension."""
    z = _differentiable(z)
    dz = flow.velocity(z, t)
    div = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(z.shape[1]))
    return dz, div


def divergence_hutchinson(flow: Flow, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """FFJORD's divergence_approx: e^T (df/dz) e by one vector-Jacobian product, e drawn per solve."""
    z = _differentiable(z)
    dz = flow.velocity(z, t)
    (e_jac,) = torch.autograd.grad(dz, z, flow.probe, create_graph=True)
    return dz, (e_jac * flow.probe).sum(1)


DIVERGENCES: dict[str, Divergence] = {
    "autojac": divergence_autojac,
    "FFJORD brute force": divergence_brute_force,
    "FFJORD Hutchinson": divergence_hutchinson,
    "autojac Hutchinson": divergence_autojac_hutchinson,
}


class Flow(nn.Module):
    """The augmented ODE (z, delta) and the log-density it gives."""

    def __init__(self, velocity: Velocity, divergence: Divergence = divergence_autojac, solver_steps: int = 4,
                 method: str = "rk4") -> None:
        super().__init__()
        self.velocity = velocity
        self.both = value_and_field(velocity)
        self.divergence = divergence
        self.solver_steps = solver_steps
        self.method = method
        self.probe = torch.empty(0)
        self.probe_seed = 0
        self.calls = 0

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z, _ = state
        self.calls += 1
        dz, div = self.divergence(self, z, t)
        return dz, -div

    def log_density(self, x: Tensor) -> Tensor:
        """log p(x) for x (B, 2): (B,)."""
        self.probe = torch.randint(0, 2, x.shape, dtype=x.dtype, device=x.device) * 2 - 1
        self.probe_seed = int(torch.randint(0, 2**62, ()))
        times = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        zs, deltas = odeint(self, (x, x.new_zeros(x.shape[0])), times, method=self.method,
                            options=dict(step_size=1 / self.solver_steps))
        z, delta = zs[-1], deltas[-1]
        log_normal = -0.5 * z.square().sum(1) - z.shape[1] * 0.5 * math.log(2 * math.pi)
        return log_normal - delta


# --- counting the plans autojac makes ---------------------------------------------------------------


class PlanCounter(logging.Handler):
    """Counts the plans autojac makes, from its INFO log: "tuned ..." (benchmarked) and "chose ..."
    (by heuristic, tuning off). A plan read from the cache or served from memory is not counted."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.made: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("tuned ", "chose ")):
            self.made.append(message)

    def __enter__(self) -> PlanCounter:
        logger = logging.getLogger("autojac")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("autojac")
        logger.removeHandler(self)
        logger.setLevel(self._level)


# --- training and timing --------------------------------------------------------------------------


@dataclass
class Training:
    flow: Flow
    losses: list[float] = field(default_factory=list)
    plans_made: list[str] = field(default_factory=list)  # the plans autojac made while training
    divergence_calls: int = 0


def train(steps: int = 300, batch: int = 512, data: str = "moons", lr: float = 5e-3, seed: int = 0,
          solver_steps: int = 4, width: int = 64, divergence: str = "autojac",
          log: Callable[[str], None] | None = None, log_every: int = 50) -> Training:
    """Train a fresh flow for `steps` Adam steps on fresh batches; the negative log-likelihood of
    every batch in `losses`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    flow = Flow(Velocity(width), DIVERGENCES[divergence], solver_steps)
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    result = Training(flow)
    with PlanCounter() as counter:
        for step in range(steps):
            x = DATA[data](batch, generator)
            loss = -flow.log_density(x).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            result.losses.append(loss.item())
            if log and (step % log_every == 0 or step == steps - 1):
                log(f"step {step:5d}  negative log-likelihood {result.losses[-1]:.3f}")
    result.plans_made = counter.made
    result.divergence_calls = flow.calls
    return result


def time_steps(velocity: Velocity, batch: int = 512, rounds: int = 15, data: str = "moons",
               solver_steps: int = 4, names: tuple[str, ...] = tuple(DIVERGENCES)) -> dict[str, float]:
    """Median seconds per training step (forward solve, backward, Adam step) of each divergence,
    on the same model and batch, interleaved round by round (the order rotating) so that a busy
    machine slows all of them alike. The first step of each, which tunes autojac, is not timed."""
    x = DATA[data](batch, torch.Generator().manual_seed(1))
    flows = {name: Flow(velocity, DIVERGENCES[name], solver_steps) for name in names}
    optimizer = torch.optim.Adam(velocity.parameters(), lr=1e-4)

    def step(flow: Flow) -> None:
        loss = -flow.log_density(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for flow in flows.values():
        step(flow)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            step(flows[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> tuple[Training, dict[str, float]]:
    parser = argparse.ArgumentParser(description="A continuous normalizing flow trained with autojac.divergence")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--data", choices=sorted(DATA), default="moons")
    parser.add_argument("--solver-steps", type=int, default=4, help="RK4 steps from t=0 to t=1")
    parser.add_argument("--rounds", type=int, default=15, help="timed training steps per method")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="a few small steps and rounds, for a smoke test")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.batch, args.solver_steps, args.rounds = 20, 128, 2, 2

    run = train(args.steps, args.batch, args.data, solver_steps=args.solver_steps, log=print)
    print(f"negative log-likelihood {run.losses[0]:.3f} -> {statistics.mean(run.losses[-10:]):.3f} "
          f"(mean of the last 10 batches)")
    print(f"{run.divergence_calls} divergence calls (every RK4 stage, each with its own t), "
          f"{len(run.plans_made)} plan(s) made (none if the cache had it already)")
    x = DATA[args.data](args.batch, torch.Generator().manual_seed(1))
    print(autojac.explain(run.flow.both, x, op="divergence", args=(torch.tensor(0.5),), has_aux=True,
                          create_graph=True).summary())

    seconds = time_steps(run.flow.velocity, args.batch, args.rounds, args.data, args.solver_steps)
    solver = f"RK4, {args.solver_steps} steps: {4 * args.solver_steps} evaluations of f per solve"
    print(f"\ntime per training step, B={args.batch}, z in R^2, {solver}; median of {args.rounds}, interleaved")
    base = seconds["autojac"]
    for name, s in seconds.items():
        print(f"  {name:20s} {s * 1e3:8.1f} ms   autojac exact / this: {base / s:.2f}")
    return run, seconds


if __name__ == "__main__":
    main()
