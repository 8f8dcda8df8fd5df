"""The demo: tune real examples, show what won and why, and how much it saves.

Each example is tuned (the plan says what was timed and what was ruled out), then the chosen
strategy is timed side by side with two things people use without autojac: `vmap(jacrev)`
(the torch.func tutorial's recipe) and the diagonal of the whole-batch Jacobian (the forum's
answer; `torch.autograd.functional.jacobian` when it fits in memory, else chunked). The last
example is second order: the Laplacian of a physics-informed network against the trace of
`vmap(hessian)` and the diagonal of the whole-batch Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import api
from .memory import format_bytes
from .models import Plan
from .planner import Planner, set_default_planner
from .store import MemoryStore
from .problem import Problem
from .strategies import get
from .strategies.basis import one_sample
from .timing import clock_for, compare

FULL_JACOBIAN_LIMIT = 2**30  # bytes: above this the literal whole-batch Jacobian is not attempted


@dataclass
class Example:
    title: str
    f: Callable[[Tensor], Tensor]
    x: Tensor


def mlp(widths: list[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers[:-1])


def examples() -> list[Example]:
    torch.manual_seed(0)
    coupled = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 4))

    def clipped(x: Tensor) -> Tensor:  # a Python branch on a value: vmap cannot run it
        return torch.tanh(x) if float(x.detach().abs().max()) < 1e6 else x

    return [
        Example("the seed problem: MLP 5 -> 2 -> 10 (sigmoid), batch 3",
                nn.Sequential(nn.Linear(5, 2), nn.Sigmoid(), nn.Linear(2, 10)), torch.randn(3, 5)),
        Example("a wider MLP 64 -> 256 -> 256 -> 64 (tanh), batch 256", mlp([64, 256, 256, 64]), torch.randn(256, 64)),
        Example("a physics-informed network u(x, t): 2 -> 64 -> 64 -> 1, batch 1024",
                mlp([2, 64, 64, 1]), torch.randn(1024, 2)),
        Example("a classifier head 784 -> 128 -> 10, batch 64", mlp([784, 128, 10], nn.ReLU), torch.randn(64, 784)),
        Example("BatchNorm in training mode (batch-coupled): 16 -> 32 -> 4, batch 32", coupled, torch.randn(32, 16)),
        Example("a function vmap cannot run (Python branch on a value), batch 64 x 32",
                lambda x: clipped(x) * x.sum(-1, keepdim=True), torch.randn(64, 32)),
    ]


def baselines(example: Example, out_numel: int) -> dict[str, Callable[[], Tensor]]:
    """What people do without autojac, for the same example."""
    f, x = example.f, example.x
    batch, n = x.shape[0], math.prod(x.shape[1:])
    found: dict[str, Callable[[], Tensor]] = {}
    plan = api.explain(f, x)
    if plan.vmap_ok and plan.batch_independent:
        jacrev = torch.func.vmap(torch.func.jacrev(one_sample(f)))
        found["vmap(jacrev)"] = lambda: jacrev(x)
    if batch * out_numel * batch * n * x.element_size() * 2 <= FULL_JACOBIAN_LIMIT:
        def whole_batch() -> Tensor:
            full = torch.autograd.functional.jacobian(f, x, vectorize=True)  # (B, *out, B, *in)
            return torch.diagonal(full, dim1=0, dim2=1 + len(plan.out_shape)).movedim(-1, 0)

        found["full-Jacobian diagonal"] = whole_batch
    else:
        full_diag = get("full_diag")
        problem = Problem("jacobian", f, x)
        found["full-Jacobian diagonal (chunked)"] = lambda: full_diag(problem, 64)
    return found


def second_order_example() -> Example:
    torch.manual_seed(0)
    return Example("the Laplacian of a physics-informed network u(x, t): 2 -> 64 -> 64 -> 1 (tanh), batch 256",
                   mlp([2, 64, 64, 1]), torch.randn(256, 2))


def laplacian_baselines(example: Example) -> dict[str, Callable[[], Tensor]]:
    """The Laplacian (B, 1) the usual ways: the trace of vmap(torch.func.hessian), and the diagonal
    of the whole-batch Hessian from torch.autograd.functional.hessian."""
    f, x = example.f, example.x
    rows = torch.arange(x.shape[0])
    per_sample = torch.func.vmap(torch.func.hessian(one_sample(f)))

    def whole_batch() -> Tensor:
        full = torch.autograd.functional.hessian(lambda z: f(z).sum(), x, vectorize=True)  # (B, n, B, n)
        return full[rows, :, rows, :].diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)

    return {"vmap(hessian) trace": lambda: per_sample(x).diagonal(dim1=-2, dim2=-1).sum(-1),
            "whole-batch Hessian diagonal": whole_batch}


def run(min_time: float = 0.3, print_fn: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Tune every example and print the plan and the speed-ups; returns the figures. The plans are
    kept in memory: the demo leaves the user's plan cache alone."""
    old = set_default_planner(Planner(store=MemoryStore()))
    try:
        return _run(min_time, print_fn)
    finally:
        set_default_planner(old)


def _run(min_time: float, print_fn: Callable[[str], None]) -> list[dict[str, float]]:
    print_fn(f"autojac demo: torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    figures = []
    for example in examples():
        plan = api.explain(example.f, example.x)
        contenders = {f"autojac ({plan.label})": lambda: api.jacobian(example.f, example.x)}
        contenders.update(baselines(example, math.prod(plan.out_shape)))
        figures.append(_show(example, plan, contenders, min_time, print_fn))
    example = second_order_example()
    plan = api.explain(example.f, example.x, op="laplacian")
    contenders = {f"autojac ({plan.label})": lambda: api.laplacian(example.f, example.x)}
    contenders.update(laplacian_baselines(example))
    figures.append(_show(example, plan, contenders, min_time, print_fn))
    return figures


def _show(example: Example, plan: Plan, contenders: dict[str, Callable[[], Tensor]], min_time: float,
          print_fn: Callable[[str], None]) -> dict[str, float]:
    """Time autojac (the first contender) against the others, print the plan and the speed-ups."""
    samples = compare(contenders, clock_for(example.x.device), min_time=min_time)
    ours = samples[next(iter(contenders))].median
    print_fn(f"== {example.title}")
    print_fn(plan.summary())
    why = _why(plan)
    if why:
        print_fn(f"  why: {why}")
    row = {"autojac": ours}
    for name, s in samples.items():
        if name.startswith("autojac"):
            continue
        ratio = s.median / ours
        verdict = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
        print_fn(f"  autojac {ours * 1e3:.3f} ms vs {name} {s.median * 1e3:.3f} ms: {verdict}")
        row[name] = s.median
    estimate = plan.memory.get(plan.label)
    if estimate:
        print_fn(f"  estimated peak memory of {plan.label}: {format_bytes(estimate)}")
    print_fn("")
    return row


def _why(plan: Plan) -> str:
    if not plan.batch_independent:
        return "f mixes samples, so only the exact diagonal-block strategy applies"
    if not plan.vmap_ok:
        return "f cannot run under vmap, so the vmap strategies were ruled out"
    return ""
