"""Everything the benchmark of leanness (benchmarks/leanness.py) uses of autojac, in one place.

The benchmark runs against the code before issue 12 and after it: when autojac's interface
changes (a new field of `Problem`, a new way to name a candidate, plans carried across batch
sizes), the change to make is here, in one function. Only the public API, the strategy
registry, `Problem`/`Sizes`, `Planner`/`MemoryStore`/`set_default_planner` and
`autojac.timing` are used.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

import autojac
from autojac.planner import Planner, set_default_planner
from autojac.problem import Problem, Sizes
from autojac.store import MemoryStore
from autojac.strategies import registry
from autojac.strategies.registry import Strategy
from autojac.timing import Clock, clock_for, compare, timed

__all__ = ["Clock", "Strategy", "clock_for", "compare", "timed"]

Run = Callable[[], Tensor]
_LABEL = re.compile(r"^(?P<name>[^\[\]]+)(\[chunk=(?P<chunk>\d+)\])?$")


def problem(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None,
            create_graph: bool = False) -> Problem:
    """The Problem a strategy is called with (a new field of Problem: add it here). `derivatives`
    is asked for the value, the Jacobian and the Laplacian, as a PINN residual needs them."""
    if op != "derivatives":
        return Problem(op, f, x, v, create_graph)  # as autojac versions without `want` take it
    return Problem(op, f, x, v, create_graph, want=("value", "jacobian", "laplacian"))


def strategy_call(strategy: Strategy, op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None,
                  chunk: int | None) -> Run:
    """The strategy called directly, as autojac's dispatch calls it: a new Problem every call."""
    return lambda: strategy(problem(op, f, x, v), chunk)


def public_call(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None) -> Run:
    """autojac.<op>(f, x) (hvp: (f, x, v)), as a user calls it."""
    fn = getattr(autojac, op)
    return (lambda: fn(f, x, v)) if op == "hvp" else (lambda: fn(f, x))


def has_public_call(op: str) -> bool:
    return callable(getattr(autojac, op, None))


def strategies() -> list[Strategy]:
    """Every registered strategy, first and second order, in registration order."""
    return list(registry.all_strategies())


def get_strategy(name: str, op: str) -> Strategy:
    return registry.get(name, op)


def operations() -> list[str]:
    """Every operation some registered strategy serves, in a stable order."""
    known = ["jacobian", "hessian", "hvp", "hessian_diag", "laplacian"]
    found = {op for s in strategies() for op in s.ops}
    return [op for op in known if op in found] + sorted(found - set(known))


def chunk_options(strategy: Strategy, x: Tensor, out_shape: tuple[int, ...]) -> tuple[int | None, ...]:
    """The chunks the registry offers this strategy for these sizes (activations do not matter)."""
    return strategy.chunk_options(Sizes.of(x, out_shape, 0))


def not_applicable(strategy: Strategy, op: str, f: Callable[[Tensor], Tensor], x: Tensor,
                   v: Tensor | None) -> str:
    """Why the strategy does not serve this f ("" if it does), from what it declares."""
    if strategy.applies is not None:
        why = strategy.applies(problem(op, f, x, v))
        if why:
            return f"does not apply: {why}"
    return ""


def coupled_only(strategy: Strategy) -> bool:
    """Kept for batch-coupled f (B times the work); the planner does not time it for others."""
    return bool(getattr(strategy, "coupled_only", False))


def label(name: str, chunk: int | None) -> str:
    return name if chunk is None else f"{name}[chunk={chunk}]"


def parse_label(text: str) -> tuple[str, int | None]:
    found = _LABEL.match(text)
    if found is None:
        raise ValueError(f"not a candidate label: {text!r}")
    chunk = found.group("chunk")
    return found.group("name"), int(chunk) if chunk else None


@dataclass
class PlannerWatch:
    """A fresh in-memory planner, and what happened in it: plans stored, tunings logged."""

    planner: Planner
    tunings: list[str] = field(default_factory=list)

    def plans(self) -> int:
        return len(self.planner.store.plans())


class _TuningLog(logging.Handler):
    def __init__(self, watch: PlannerWatch):
        super().__init__(logging.INFO)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("tuned "):  # the planner's line for each plan it tunes
            self.watch.tunings.append(message)


@contextlib.contextmanager
def fresh_planner() -> Iterator[PlannerWatch]:
    """A new planner with an in-memory store as autojac's default, for the block: no plan from
    disk or from an earlier measurement; restores the previous one after."""
    watch = PlannerWatch(Planner(MemoryStore()))
    old = set_default_planner(watch.planner)
    logger = logging.getLogger("autojac")
    handler, level = _TuningLog(watch), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        set_default_planner(old)


def explain(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None) -> autojac.Plan:
    """The plan autojac uses for this call (made if needed)."""
    return autojac.explain(f, x, op=op, v=v)


def plan_facts(plan: autojac.Plan) -> dict:
    """What the reports keep of a plan: its winner, batch size, tuning time; and, where the plan
    says so, the batch size it was tuned at (a field that may appear with issue 12)."""
    facts = {"label": plan.label, "tuned": plan.tuned, "batch_size": plan.batch_size,
             "tuning_seconds": plan.tuning_seconds}
    for name in ("tuned_batch", "tuned_batch_size", "tuned_at", "source_batch_size"):
        if getattr(plan, name, None) is not None:
            facts[name] = getattr(plan, name)
    return facts


def tuner_timings(plan: autojac.Plan) -> dict[str, float]:
    """Candidate label -> the tuner's median seconds, as the plan records them ({} if it does not)."""
    return dict(getattr(plan, "timings", None) or {})


def own_candidates(plan: autojac.Plan, op: str, x: Tensor, out_shape: tuple[int, ...]) -> list[tuple[str, int | None]]:
    """The candidates the planner weighed for this plan (valid for f and within its memory
    budget: the plan's memory estimates name them); from the registry if the plan lists none."""
    labels = list(getattr(plan, "memory", None) or {})
    if not labels:
        labels = [label(s.name, c) for s in strategies() if op in s.ops and not coupled_only(s)
                  for c in chunk_options(s, x, out_shape)]
    return [parse_label(text) for text in labels]


def tensor_out_shape(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(f(x).shape[1:])
