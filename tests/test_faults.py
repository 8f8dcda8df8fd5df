"""Faults during tuning: the user gets a correct result, or an error that lists every reason."""

import pytest
import torch

import autojac
from autojac import planner as planner_module
from autojac.planner import default_planner
from autojac.signature import signature
from autojac.strategies import registry
from autojac.strategies.registry import BATCH_INDEPENDENT, Strategy

from helpers import assert_close, loop_jacobian, mlp


def _fake(name, run):
    return Strategy(name=name, ops=frozenset({"jacobian"}), run=run, memory=lambda s, c: 0,
                    needs=frozenset({BATCH_INDEPENDENT}))


@pytest.fixture
def faulty(monkeypatch):
    """Register strategies and try them first; they vanish after the test."""
    monkeypatch.setenv("AUTOJAC_TUNE_BUDGET", "10")
    with registry.temporary() as reg:
        names = []

        def add(name, run):
            reg.add(_fake(name, run))
            names.append(name)

        original = registry._HEURISTICS["jacobian"]
        monkeypatch.setitem(registry._HEURISTICS, "jacobian", lambda s: names + original(s))
        yield add


def _raise(error):
    def run(problem, chunk):
        raise error
    return run


def test_raising_out_of_memory_and_nan_candidates_are_excluded_and_the_answer_is_right(faulty):
    faulty("raises", _raise(RuntimeError("no batching rule for aten::foo")))
    faulty("cuda_oom", _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")))
    faulty("cpu_oom", _raise(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                          "can't allocate memory: you tried to allocate 21474836480 bytes")))
    faulty("nan", lambda p, c: torch.full((p.batch, 3, *p.in_shape), float("nan")))
    f, x = mlp(5, 3), torch.randn(4, 5)
    with pytest.warns(autojac.AutojacWarning, match="nan excluded"):
        result = autojac.jacobian(f, x)
    assert_close(result, loop_jacobian(f, x))
    excluded = autojac.explain(f, x).excluded
    assert excluded["raises"] == "RuntimeError: no batching rule for aten::foo"
    assert excluded["cuda_oom"].startswith("out of memory: OutOfMemoryError")
    assert excluded["cpu_oom"].startswith("out of memory: RuntimeError")
    assert "disagrees" in excluded["nan"]


def test_memory_is_released_after_an_out_of_memory_candidate_before_the_next_is_timed(faulty, monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))

    def oom(problem, chunk):
        events.append("oom")
        raise torch.OutOfMemoryError("CUDA out of memory")

    def next_one(problem, chunk):
        events.append("next")
        return registry.get("sum_rev")(problem, chunk)

    faulty("oom", oom)
    faulty("next_one", next_one)
    autojac.jacobian(mlp(5, 3), torch.randn(4, 5))
    assert events[:3] == ["oom", "empty_cache", "next"]


def test_keyboard_interrupt_propagates_and_leaves_no_half_made_plan(faulty):
    def interrupt(problem, chunk):
        raise KeyboardInterrupt

    faulty("interrupt", interrupt)
    f, x = mlp(5, 3), torch.randn(4, 5)
    with pytest.raises(KeyboardInterrupt):
        autojac.jacobian(f, x)
    planner = default_planner()
    assert planner.store.plans() == []
    assert not planner._lock_for(signature("jacobian", f, x)).locked()  # the next caller will not hang


def test_when_every_candidate_fails_the_error_lists_each_reason(faulty, monkeypatch):
    faulty("only", _raise(RuntimeError("broken")))
    monkeypatch.setattr(planner_module, "candidates", _only("only"))
    with pytest.raises(autojac.NoCandidateError, match=r"only: RuntimeError: broken"):
        autojac.jacobian(mlp(5, 3), torch.randn(4, 5))


def _only(name):
    real = planner_module.candidates

    def candidates(op, sizes, probes, **kw):
        pool, excluded = real(op, sizes, probes, **kw)
        return [c for c in pool if c.strategy.name == name], excluded

    return candidates


def test_a_request_too_big_for_memory_says_what_each_needs_and_suggests_a_smaller_batch(monkeypatch):
    monkeypatch.setattr(planner_module.memory, "budget_bytes", lambda device: 1024)
    with pytest.raises(autojac.NoCandidateError) as caught:
        autojac.jacobian(mlp(64, 64), torch.randn(256, 64))
    message = str(caught.value)
    assert "sum_rev: needs about" in message and "over the memory budget of 1.0 KiB" in message
    assert "torch.split(x, 64)" in message
