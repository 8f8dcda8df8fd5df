"""A user's script, typed: `mypy --strict` must pass on it (tests/test_typing.py checks it, and runs it).

Every autojac name must resolve to its real type here, not to Any: `assert_type` fails under mypy
otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import assert_type

import autojac
from autojac import Estimator, Op, Plan, Quantity


def per_sample_derivatives(model: nn.Module, x: Tensor) -> dict[Op, Tensor]:
    """Every operation of the model at x, by name."""
    v = torch.randn_like(x)
    return {
        "jacobian": autojac.jacobian(model, x, tune=False),
        "hessian": autojac.hessian(model, x, tune=False),
        "hvp": autojac.hvp(model, x, v, tune=False),
        "hessian_diag": autojac.hessian_diag(model, x, create_graph=True, tune=False),
        "laplacian": autojac.laplacian(model, x, strategy="auto", batch_independent=True, tune=False),
    }


def flow_terms(field: nn.Module, x: Tensor, estimator: Estimator = "exact") -> Tensor:
    """The divergence of a vector field (B, n) -> (B, n), exact or estimated."""
    if estimator == "hutchinson":  # probes belong to the estimate; the exact divergence refuses them
        estimate: Tensor = autojac.divergence(field, x, estimator=estimator, samples=4,
                                              generator=torch.Generator().manual_seed(0))
        return estimate
    divergence: Tensor = autojac.divergence(field, x, estimator=estimator)
    return divergence


def pinn_terms(u: nn.Module, x: Tensor, wanted: tuple[Quantity, ...] = ("value", "laplacian")) -> Tensor:
    """A Poisson residual from the value and the Laplacian, computed together."""
    found = autojac.derivatives(u, x, ops=wanted, tune=False)
    assert found.value is not None and found.laplacian is not None
    residual: Tensor = found.laplacian - found.value
    return residual


def describe(model: nn.Module, x: Tensor, op: Op = "jacobian") -> str:
    v = torch.randn_like(x) if op == "hvp" else None
    plan = autojac.explain(model, x, op=op, v=v, tune=False)
    assert_type(plan, Plan)
    chunk: int | None = plan.chunk
    timings: dict[str, float] = plan.timings
    return f"{plan.summary()} (chunk {chunk}, {len(timings)} timed, create_graph={plan.create_graph})"


def main() -> list[str]:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    results = per_sample_derivatives(model, x)
    field = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    assert flow_terms(field, x).shape == flow_terms(field, x, "hutchinson").shape == (5,)
    assert pinn_terms(model, x).shape == (5, 2)
    assert_type(results["jacobian"], Tensor)
    lines = [describe(model, x, op) for op in results]
    plans: list[Plan] = autojac.warm(model, x, ops=("jacobian", "laplacian"), tune=False)
    stored: list[Plan] = autojac.plans(op="laplacian", device="cpu")
    lines.append(f"autojac {autojac.__version__}: {len(plans)} warmed, {len(stored)} stored in {autojac.cache_path()}")
    try:
        autojac.jacobian(model, x, strategy="no_such_strategy")
    except ValueError as error:
        lines.append(str(error))
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
