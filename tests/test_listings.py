"""Plan listings tell plans apart (`autojac plans`, `Plan.summary`): create_graph and any call
option a plan gains later, and why the winner won when a timed candidate was faster."""

from __future__ import annotations

import torch

import autojac
from autojac import cli
from autojac.models import Plan
from autojac.strategies.registry import Strategy
from autojac.timing import Clock, TuneSettings
from autojac.tuner import Candidate, choose

from helpers import mlp


def _plans_table(capsys) -> list[list[str]]:
    assert cli.main(["plans"]) == 0
    return [line.split() for line in capsys.readouterr().out.splitlines()[:-1]]


def test_create_graph_tells_two_plans_apart(capsys):
    model, x = mlp(5, 3), torch.randn(4, 5)
    plain, graph = (autojac.explain(model, x, create_graph=flag, tune=False) for flag in (False, True))
    assert plain.options_text() == "" and graph.options_text() == "create_graph"
    assert "create_graph" not in plain.summary().splitlines()[0]
    assert graph.summary().splitlines()[0].startswith("jacobian of Sequential [B=4 in=(5,) out=(3,) float32 cpu "
                                                      "create_graph]: ")
    header, *rows = _plans_table(capsys)
    column = header.index("OPTIONS")
    assert sorted(row[column] for row in rows) == ["-", "create_graph"]


class _FuturePlan(Plan):
    """A plan with fields the listings do not know by name, as plans will gain."""

    dims: tuple[int, ...] | None = None
    ops: frozenset[str] = frozenset()


def test_options_a_plan_gains_are_listed_without_naming_them():
    plan = autojac.explain(mlp(5, 3), torch.randn(4, 5), tune=False)
    future = _FuturePlan(**plan.model_dump())
    assert future.call_options() == {}  # defaults are not shown
    future = _FuturePlan(**plan.model_dump(), dims=(0, 2), ops=frozenset({"value", "laplacian"}))
    assert future.call_options() == {"dims": (0, 2), "ops": frozenset({"value", "laplacian"})}
    assert future.options_text() == "dims=(0,2) ops=(laplacian,value)"
    assert "cpu dims=(0,2) ops=(laplacian,value)]: " in future.summary()


def _tuned(plan: Plan, timings: dict[str, float], memory: dict[str, int], winner: str) -> Plan:
    name, _, chunk = winner.partition("[chunk=")
    return plan.model_copy(update=dict(strategy=name, chunk=int(chunk[:-1]) if chunk else None, timings=timings,
                                       memory=memory, tuned=True))


def test_the_summary_says_why_a_slower_candidate_won():
    plan = autojac.explain(mlp(5, 3), torch.randn(4, 5), tune=False)
    # ties go to the lower memory estimate
    won = _tuned(plan, {"sum_rev": 1.00e-3, "sum_grad": 1.03e-3}, {"sum_rev": 4 * 2**20, "sum_grad": 2**20},
                 "sum_grad")
    line = won.why_not_fastest()
    assert line.startswith("sum_grad won though sum_rev was faster (x1.03): medians within 5% of the fastest tie")
    assert line.endswith("the lower memory estimate (1.0 MiB against 4.0 MiB)")
    assert line in won.summary()
    # equal estimates: the heuristic order (the order of `memory`, as the planner lists candidates)
    won = _tuned(plan, {"vmap_rev": 2.0e-3, "sum_rev": 2.08e-3}, {"sum_rev": 1024, "vmap_rev": 1024}, "sum_rev")
    assert won.why_not_fastest().endswith("then the heuristic order: sum_rev comes before vmap_rev")
    # one strategy's forms: the whole basis before chunks
    won = _tuned(plan, {"sum_rev[chunk=16]": 1.0e-3, "sum_rev": 1.01e-3}, {"sum_rev": 64, "sum_rev[chunk=16]": 64},
                 "sum_rev")
    assert won.why_not_fastest().endswith("then the whole basis")
    # the fastest won: nothing to explain
    won = _tuned(plan, {"sum_rev": 1.0e-3, "sum_grad": 1.03e-3}, {"sum_rev": 64, "sum_grad": 32}, "sum_rev")
    assert won.why_not_fastest() == "" and " won though " not in won.summary()


class _Clock(Clock):
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def test_the_reason_matches_what_the_tuner_did():
    # Three candidates in heuristic order, timed on a fake clock: the fastest, a (3% slower) one with
    # a lower memory estimate, a (2% slower) one with the same estimate as that one but later in order.
    costs = {"sum_rev": 1.00, "sum_grad": 1.03, "vmap_rev": 1.02}
    memory = {"sum_rev": 100, "sum_grad": 50, "vmap_rev": 50}
    pool = [Candidate(Strategy(name=name, ops=frozenset({"jacobian"}), run=None, memory=lambda s, c: 0),
                      None, memory[name], rank) for rank, name in enumerate(costs)]
    clock = _Clock()

    def run(candidate: Candidate) -> torch.Tensor:
        clock.t += costs[candidate.label]
        return torch.ones(2, 3)

    outcome = choose(pool, run, clock=clock, settings=TuneSettings(budget=100.0), tune=True)
    plan = autojac.explain(mlp(5, 3), torch.randn(4, 5), tune=False).model_copy(update=dict(
        strategy=outcome.winner.strategy.name, chunk=None, tuned=True,
        timings={label: s.median for label, s in outcome.samples.items()}, memory={c.label: c.memory for c in pool}))
    assert plan.strategy == "sum_grad"
    assert "sum_grad won though sum_rev was faster (x1.03)" in plan.summary()
    assert "the lower memory estimate (50 B against 100 B)" in plan.summary()


def test_how_a_plan_was_made_and_the_call_it_serves_are_listed(capsys):
    plan = autojac.explain(mlp(5, 3), torch.randn(4, 5))
    assert plan.call_options() == {}  # evidence (activations, family, ...) is not an option
    reused = plan.model_copy(update=dict(tuned_batch=8, call="args=(0,None)"))
    assert reused.how() == "tuned at B=8" and reused.options_text() == "call=args=(0,None)"
    assert reused.summary().splitlines()[0].endswith("call=args=(0,None)]: " + f"{plan.label} (tuned at B=8)")
    assert plan.how() == "tuned" and plan.model_copy(update=dict(tuned=False)).how() == "heuristic"
