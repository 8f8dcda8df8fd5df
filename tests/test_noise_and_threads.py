"""Plans that do not flip with timing noise, and one tuning per signature across threads."""

import random
import threading

import torch

import autojac
from autojac.planner import default_planner
from autojac.tuner import Candidate, choose
from autojac.strategies import registry
from autojac.strategies.registry import Strategy
from autojac.timing import Clock, TuneSettings

from helpers import assert_close, loop_jacobian, mlp


class NoisyClock(Clock):
    def __init__(self, seed):
        self.t = 0.0
        self.random = random.Random(seed)


def _make(name, memory, rank):
    return Candidate(Strategy(name=name, ops=frozenset({"jacobian"}), run=None, memory=lambda s, c: memory),
                     None, memory, rank)


def _tune(costs, pool, seed, noise):
    clock = NoisyClock(seed)

    def run(candidate):
        clock.t += costs[candidate.label] * (1 + clock.random.uniform(-noise, noise))
        return torch.ones(2)

    clock.now = lambda: clock.t
    return choose(pool, run, clock=clock, settings=TuneSettings(budget=50.0), tune=True).winner.label


def test_a_winner_that_leads_by_more_than_20_percent_survives_10_percent_noise():
    pool = [_make("a", 10, 0), _make("b", 20, 1), _make("c", 5, 2)]
    costs = {"a": 1.25, "b": 1.0, "c": 1.3}
    assert {_tune(costs, pool, seed, noise=0.10) for seed in range(30)} == {"b"}


def test_candidates_within_the_noise_margin_tie_to_the_lower_memory_estimate():
    pool = [_make("a", 30, 0), _make("b", 10, 1), _make("c", 20, 2)]
    costs = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert {_tune(costs, pool, seed, noise=0.01) for seed in range(30)} == {"b"}


def test_many_threads_on_one_new_signature_tune_once_and_all_get_the_right_answer(monkeypatch):
    planner = default_planner()
    made = []
    real_make = planner._make

    def counting_make(*args, **kwargs):
        made.append(args[0])
        return real_make(*args, **kwargs)

    monkeypatch.setattr(planner, "_make", counting_make)
    f, x = mlp(5, 3), torch.randn(4, 5)
    results = [None] * 8

    def work(i):
        results[i] = autojac.jacobian(f, x)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(made) == 1
    expected = loop_jacobian(f, x)
    for result in results:
        assert_close(result, expected)


def test_different_signatures_tune_independently(monkeypatch):
    # The strategy for shape A blocks until shape B's plan exists: one global lock would deadlock.
    monkeypatch.setenv("AUTOJAC_TUNE", "0")
    b_planned = threading.Event()
    f = mlp(5, 3)
    x_a, x_b = torch.randn(3, 5), torch.randn(6, 5)

    def waits_for_b(problem, chunk):
        if problem.batch == 3:
            assert b_planned.wait(timeout=30), "tuning of another signature was blocked"
        return registry.get("sum_rev")(problem, chunk)

    with registry.temporary() as reg:
        reg.add(Strategy(name="waits_for_b", ops=frozenset({"jacobian"}), run=waits_for_b,
                         memory=lambda s, c: 0))
        monkeypatch.setitem(registry._HEURISTICS, "jacobian", lambda s: ["waits_for_b"])
        out = {}
        thread = threading.Thread(target=lambda: out.setdefault("a", autojac.jacobian(f, x_a)))
        thread.start()
        out["b"] = autojac.jacobian(f, x_b)
        b_planned.set()
        thread.join(timeout=60)
    assert_close(out["a"], loop_jacobian(f, x_a))
    assert_close(out["b"], loop_jacobian(f, x_b))
