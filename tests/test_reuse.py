"""Tuning that costs what it can save (issue 12): plans carried across batch sizes, warming several
batch sizes, the environment followed as it changes, the budget of a cheap problem, the cost model."""

import pytest
import torch

import autojac
from autojac import planner as planner_module
from autojac.planner import Planner, candidates, set_default_planner
from autojac.cache import default_store
from autojac.probes import Probes
from autojac.problem import Sizes
from autojac.timing import Clock, TuneSettings
from autojac.tuner import Candidate, choose
from autojac.strategies.registry import Strategy

from helpers import assert_close, loop_jacobian, mlp


def count_tunings(monkeypatch):
    counted = []
    real = planner_module.choose

    def counting(*args, **kwargs):
        counted.append(kwargs.get("tune"))
        return real(*args, **kwargs)

    monkeypatch.setattr(planner_module, "choose", counting)
    return counted


def test_a_batch_size_within_2x_of_a_tuned_one_reuses_its_plan_without_timing(monkeypatch):
    f = mlp(5, 3)
    autojac.jacobian(f, torch.randn(32, 5))
    counted = count_tunings(monkeypatch)
    for batch in (17, 33, 64):  # 32/17 < 2, 64/32 = 2
        x = torch.randn(batch, 5)
        assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
        plan = autojac.explain(f, x)
        assert plan.tuned_batch == 32 and plan.batch_size == batch and "tuned at B=32" in plan.summary()
    assert counted == []
    autojac.jacobian(f, torch.randn(65, 5))  # over 2x: a plan of its own
    assert counted == [True]
    assert autojac.explain(f, torch.randn(65, 5)).tuned_batch is None


@pytest.mark.parametrize("op,create_graph", [("laplacian", False), ("hessian_diag", True), ("jacobian", True)])
def test_a_new_batch_size_within_2x_is_not_probed_again(monkeypatch, op, create_graph):
    # what the probes found about f (its fused normalizations among it) holds at every batch size
    f = mlp(3, 1)
    getattr(autojac, op)(f, torch.randn(32, 3), create_graph=create_graph)
    probed = []
    real = planner_module.run_probes
    monkeypatch.setattr(planner_module, "run_probes", lambda *a, **k: probed.append(1) or real(*a, **k))
    getattr(autojac, op)(f, torch.randn(48, 3), create_graph=create_graph)
    assert probed == []


def test_a_reused_plan_is_kept_in_memory_and_made_again_in_a_new_process():
    f = mlp(5, 3)
    autojac.jacobian(f, torch.randn(32, 5))
    autojac.jacobian(f, torch.randn(40, 5))
    assert [p.batch_size for p in autojac.plans()] == [32]  # only tuned plans are stored
    set_default_planner(Planner(default_store()))  # a new process, the same cache
    assert autojac.explain(f, torch.randn(40, 5), tune=False).tuned_batch == 32


def test_warm_makes_a_plan_for_each_batch_size_asked(monkeypatch):
    f, x = mlp(4, 2), torch.randn(8, 4)
    plans = autojac.warm(f, x, ops=("jacobian", "laplacian"), batch_sizes=[8, 12, 3])
    assert [(p.op, p.batch_size) for p in plans] == [("jacobian", 8), ("laplacian", 8), ("jacobian", 12),
                                                       ("laplacian", 12), ("jacobian", 3), ("laplacian", 3)]
    assert all(p.tuned and p.tuned_batch is None for p in plans)  # each timed at its own size, not reused
    with pytest.raises(ValueError, match="batch_sizes must be positive ints"):
        autojac.warm(f, x, batch_sizes=[0])


def test_warm_resizes_per_sample_arguments_and_v():
    f = lambda x, c: torch.tanh(x * c).sum(-1)  # noqa: E731
    x, c = torch.randn(4, 3), torch.randn(4, 3)
    plans = autojac.warm(f, x, ops=("hvp",), batch_sizes=[6], args=(c,))
    assert plans[0].batch_size == 6 and "args=T(3,)float32@0" in plans[0].call


def test_the_cache_directory_is_followed_when_the_environment_changes(monkeypatch, tmp_path):
    f, x = mlp(3, 2), torch.randn(4, 3)
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(tmp_path / "one"))
    autojac.warm(f, x)
    assert autojac.cache_path() == tmp_path / "one" / autojac.cache_path().name
    assert len(autojac.plans()) == 1
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(tmp_path / "two"))
    assert autojac.plans() == [] and autojac.cache_path().parent == tmp_path / "two"
    autojac.warm(f, torch.randn(9, 3))
    assert [p.batch_size for p in autojac.plans()] == [9]
    assert autojac.export_plans(tmp_path / "two.json") == 1
    assert autojac.clear_cache() == 1
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(tmp_path / "one"))
    assert [p.batch_size for p in autojac.plans()] == [4]  # the first directory is untouched


class StepClock(Clock):
    """Each reading advances by the cost of the candidate being run."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def _candidate(name, rank):
    strategy = Strategy(name=name, ops=frozenset({"jacobian"}), run=None, memory=lambda s, c: 0)
    return Candidate(strategy, None, 0, rank)


def test_a_cheap_problem_is_tuned_within_the_cheap_budget_and_its_winner_timed_three_times():
    clock = StepClock()
    costs = {"a": 1e-3, "b": 1.2e-3, "c": 5e-3}
    pool = [_candidate(name, rank) for rank, name in enumerate(costs)]
    calls = []

    def run(candidate):
        calls.append(candidate.label)
        clock.t += costs[candidate.label]
        return torch.ones(2)

    outcome = choose(pool, run, clock=clock, settings=TuneSettings(budget=1.0), tune=True, started=0.0)
    assert outcome.winner.label == "a" and len(outcome.samples["a"].seconds) >= 3
    assert clock.t <= TuneSettings().cheap_budget + 2 * costs["c"]  # 100 ms, not the 1 s budget


def test_the_winner_is_never_decided_by_one_timing():
    clock = StepClock()
    costs = {"lucky": [0.05, 0.05, 0.5, 0.5, 0.5], "steady": [0.2] * 10}
    pool = [_candidate("lucky", 0), _candidate("steady", 1)]

    def run(candidate):
        clock.t += costs[candidate.label].pop(0)
        return torch.ones(2)

    outcome = choose(pool, run, clock=clock, settings=TuneSettings(budget=0.3), tune=True, started=0.0)
    assert len(outcome.samples[outcome.winner.label].seconds) >= 2  # past the budget: twice, not three times
    assert outcome.winner.label == "steady"


def test_the_cost_model_leaves_out_what_cannot_win_only_where_compute_dominates():
    probes = Probes(out_shape=(1,), batch_independent=True, vmap_ok=True, deterministic=True, activations=0)
    big = Sizes(batch=512, n=512, m=1, itemsize=4, activations=4 * 2**20)
    _, excluded = candidates("jacobian", big, probes, create_graph=False, budget=None)
    assert "cost model" in excluded["sum_fwd"] and "cost model" in excluded["vmap_fwd"]
    assert "loop_rev" not in excluded
    small = Sizes(batch=4, n=512, m=1, itemsize=4, activations=16 * 1024)
    _, excluded = candidates("jacobian", small, probes, create_graph=False, budget=None)
    assert "sum_fwd" not in excluded  # per-call overhead decides there: timed
