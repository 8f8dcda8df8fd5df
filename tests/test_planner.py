"""The planner's choice logic, with candidates given known costs through a fake clock."""

import pytest
import torch

from autojac.errors import NoCandidateError
from autojac.errors import AutojacWarning
from autojac.planner import candidates, heuristic_order
from autojac.tuner import Candidate, choose
from autojac.probes import Probes
from autojac.problem import Sizes
from autojac.strategies.registry import Strategy
from autojac.timing import Clock, TuneSettings

SETTINGS = TuneSettings(budget=100.0)
ANSWER = torch.arange(6.0).view(2, 3)


class FakeClock(Clock):
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def make(name, *, memory=0, rank=0, chunk=None):
    strategy = Strategy(name=name, ops=frozenset({"jacobian"}), run=None, memory=lambda s, c: memory)
    return Candidate(strategy, chunk, memory, rank)


def runner(clock, costs, results=None, errors=None, calls=None):
    def run(candidate):
        if calls is not None:
            calls.append(candidate.label)
        if errors and candidate.label in errors:
            raise errors[candidate.label]
        clock.t += costs[candidate.label]
        return (results or {}).get(candidate.label, ANSWER)
    return run


def tune(pool, costs, settings=SETTINGS, **kw):
    clock = FakeClock()
    return choose(pool, runner(clock, costs, **kw), clock=clock, settings=settings, tune=True)


def test_the_fastest_candidate_wins():
    pool = [make("a", rank=0), make("b", rank=1), make("c", rank=2)]
    outcome = tune(pool, {"a": 3.0, "b": 1.0, "c": 2.0})
    assert outcome.winner.label == "b"
    assert outcome.samples["b"].median == 1.0 and outcome.samples["c"].median == 2.0


def test_ties_go_to_lower_memory_then_heuristic_rank_every_time():
    pool = [make("a", memory=100, rank=0), make("b", memory=50, rank=1), make("c", memory=50, rank=2)]
    costs = {"a": 1.00, "b": 1.03, "c": 1.02}  # all within the 5% margin
    winners = {tune(pool, costs).winner.label for _ in range(3)}
    assert winners == {"b"}
    # outside the margin the fastest wins whatever its memory
    assert tune(pool, {"a": 1.0, "b": 1.2, "c": 1.3}).winner.label == "a"


def test_a_much_slower_candidate_is_dropped_after_one_timed_call():
    pool = [make("fast", rank=0), make("slow", rank=1)]
    outcome = tune(pool, {"fast": 1.0, "slow": 10.0})
    assert outcome.winner.label == "fast"
    assert len(outcome.samples["slow"].seconds) == 1
    assert len(outcome.samples["fast"].seconds) >= SETTINGS.min_repeats


def sequence_runner(clock, costs):
    """Each candidate's calls take the times listed for it, in turn (the last one repeats)."""
    def run(candidate):
        times = costs[candidate.label]
        clock.t += times.pop(0) if len(times) > 1 else times[0]
        return ANSWER
    return run


@pytest.mark.parametrize("fast_calls", [
    [1.0, 5.0, 0.5],   # its timed call landed on a busy moment: 10x the best, then 0.5
    [50.0, 0.5],       # a slow first call (one-time costs), cheap against the budget: timed anyway
])
def test_one_slow_timing_does_not_drop_the_fastest_candidate(fast_calls):
    clock = FakeClock()
    pool = [make("steady", rank=0), make("fast", rank=1)]
    outcome = choose(pool, sequence_runner(clock, {"steady": [1.0], "fast": fast_calls}), clock=clock,
                     settings=TuneSettings(budget=5000.0), tune=True)
    assert outcome.winner.label == "fast"


def test_the_budget_stops_timing_and_says_so():
    pool = [make("a", rank=0), make("b", rank=1), make("c", rank=2)]
    outcome = tune(pool, {"a": 2.0, "b": 2.0, "c": 0.1}, settings=TuneSettings(budget=5.0))
    assert "c" not in outcome.samples
    assert "tuning budget" in outcome.excluded["c"]


def test_a_failing_candidate_is_excluded_with_its_reason():
    pool = [make("broken", rank=0), make("ok", rank=1)]
    outcome = tune(pool, {"broken": 0.1, "ok": 1.0}, errors={"broken": RuntimeError("no batching rule for foo")})
    assert outcome.winner.label == "ok"
    assert outcome.excluded["broken"] == "RuntimeError: no batching rule for foo"


def test_when_every_candidate_fails_the_error_lists_each_reason():
    pool = [make("a"), make("b", rank=1)]
    errors = {"a": RuntimeError("first"), "b": ValueError("second")}
    with pytest.raises(NoCandidateError) as caught:
        tune(pool, {"a": 1.0, "b": 1.0}, errors=errors)
    assert "a: RuntimeError: first" in str(caught.value) and "b: ValueError: second" in str(caught.value)


def test_out_of_memory_unchunked_leads_to_its_chunked_variant():
    pool = [make("big", rank=0), make("other", rank=1), make("big", rank=0, chunk=16)]
    errors = {"big": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB")}
    outcome = tune(pool, {"big": 1.0, "other": 5.0, "big[chunk=16]": 1.0}, errors=errors)
    assert outcome.excluded["big"].startswith("out of memory")
    assert outcome.winner.label == "big[chunk=16]"


def test_chunked_variants_are_only_tried_for_strategies_near_the_best():
    pool = [make("near", rank=0), make("far", rank=1), make("near", chunk=16, rank=0), make("far", chunk=16, rank=1)]
    calls = []
    outcome = tune(pool, {"near": 1.0, "far": 2.0, "near[chunk=16]": 0.5, "far[chunk=16]": 0.1}, calls=calls)
    assert outcome.winner.label == "near[chunk=16]"
    assert "far[chunk=16]" not in calls and "not timed" in outcome.excluded["far[chunk=16]"]


def test_a_candidate_that_disagrees_with_the_majority_is_excluded_with_a_warning():
    pool = [make("wrong", rank=0), make("b", rank=1), make("c", rank=2)]
    results = {"wrong": ANSWER.clone().fill_(float("nan"))}
    with pytest.warns(AutojacWarning, match="wrong excluded"):
        outcome = tune(pool, {"wrong": 0.1, "b": 1.0, "c": 2.0}, results=results)
    assert outcome.winner.label == "b"
    assert "disagrees" in outcome.excluded["wrong"] and "wrong" not in outcome.samples


def test_heuristic_mode_takes_the_first_candidate_that_runs_and_times_nothing():
    pool = [make("a", rank=0), make("b", rank=1), make("c", rank=2)]
    clock = FakeClock()
    calls = []
    run = runner(clock, {"a": 1.0, "b": 9.0, "c": 0.1}, errors={"a": RuntimeError("nope")}, calls=calls)
    outcome = choose(pool, run, clock=clock, settings=SETTINGS, tune=False)
    assert outcome.winner.label == "b" and calls == ["a", "b"]
    assert all(not s.seconds for s in outcome.samples.values())
    assert torch.equal(outcome.result, ANSWER)


def _probes(**kw):
    base = dict(out_shape=(3,), batch_independent=True, vmap_ok=True, deterministic=True, activations=1000)
    return Probes(**{**base, **kw})


def test_candidates_for_a_coupled_function_are_full_diag_only():
    sizes = Sizes(batch=8, n=5, m=3, itemsize=4, activations=1000)
    pool, excluded = candidates("jacobian", sizes, _probes(batch_independent=False, coupling="mixes"),
                                create_graph=False, budget=None)
    assert {c.strategy.name for c in pool} == {"full_diag"}
    assert "batch-independent" in excluded["sum_rev"] and "mixes" in excluded["sum_rev"]


def test_candidates_without_vmap_drop_the_vmap_strategies():
    sizes = Sizes(batch=8, n=5, m=3, itemsize=4, activations=1000)
    pool, excluded = candidates("jacobian", sizes, _probes(vmap_ok=False, vmap_error="boom"),
                                create_graph=False, budget=None)
    names = {c.strategy.name for c in pool}
    assert names == {"sum_rev", "sum_grad", "sum_fwd", "loop_rev", "jet_jacobian_fwd", "jet_jacobian_rev",
                     "jet_jacobian_meet"}
    assert "vmap" in excluded["vmap_rev"] and "boom" in excluded["vmap_rev"]


def test_the_memory_budget_leaves_out_what_does_not_fit_but_keeps_chunks_that_do():
    sizes = Sizes(batch=512, n=512, m=512, itemsize=4, activations=512 * 256 * 4 * 6)
    pool, excluded = candidates("jacobian", sizes, _probes(), create_graph=False, budget=2 * 2**30)
    labels = {c.label for c in pool}
    assert "sum_rev" not in labels and "memory budget" in excluded["sum_rev"]
    assert "sum_rev[chunk=16]" in labels


def test_heuristic_table_prefers_one_backward_pass_for_scalar_outputs_and_forward_mode_for_few_inputs():
    assert heuristic_order("jacobian", Sizes(32, 64, 1, 4, 0))[0] == "loop_rev"
    assert heuristic_order("jacobian", Sizes(32, 2, 64, 4, 0))[:3] == ["jet_jacobian_fwd", "jet_jacobian_meet", "sum_fwd"]
    assert heuristic_order("jacobian", Sizes(32, 64, 2, 4, 0))[:2] == ["jet_jacobian_rev", "sum_rev"]
    many_rows = heuristic_order("jacobian", Sizes(512, 512, 512, 4, 0))  # per sample before over the batch
    assert many_rows.index("vmap_rev") < many_rows.index("sum_rev")


def test_a_warm_up_that_spends_the_budget_is_not_repeated_and_nothing_else_starts():
    pool = [make("slow", rank=0), make("b", rank=1)]
    calls = []
    outcome = tune(pool, {"slow": 3.0, "b": 1.0}, settings=TuneSettings(budget=2.0), calls=calls)
    assert calls == ["slow"]  # one call: its warm-up time is its sample
    assert outcome.winner.label == "slow" and outcome.samples["slow"].seconds == [3.0]
    assert "tuning budget" in outcome.excluded["b"]


def test_no_candidate_starts_when_less_budget_is_left_than_the_best_time():
    pool = [make("a", rank=0), make("b", rank=1)]
    outcome = tune(pool, {"a": 1.0, "b": 0.5}, settings=TuneSettings(budget=2.5))
    assert "b" not in outcome.samples and "tuning budget" in outcome.excluded["b"]


def test_a_strategy_too_big_to_run_whole_is_first_tried_at_its_largest_chunk():
    pool = [make("big", memory=200, rank=0), make("big", memory=50, rank=0, chunk=64),
            make("big", memory=20, rank=0, chunk=16), make("small", memory=10, rank=1)]
    costs = {"big": 3.0, "big[chunk=64]": 1.0, "big[chunk=16]": 1.2, "small": 2.0}
    for tuned in (True, False):
        clock, calls = FakeClock(), []
        outcome = choose(pool, runner(clock, costs, calls=calls), clock=clock, settings=SETTINGS, tune=tuned,
                         chunk_first_above=100)
        assert outcome.winner.label == "big[chunk=64]"
        assert calls[0] == "big[chunk=64]"
    # warm-up and timed call of each first form, then the other forms of the promising strategy
    clock, calls = FakeClock(), []
    choose(pool, runner(clock, costs, calls=calls), clock=clock, settings=SETTINGS, tune=True, chunk_first_above=100)
    assert calls[:4] == ["big[chunk=64]", "big[chunk=64]", "small", "small"]
    assert {"big", "big[chunk=16]"} <= set(calls[4:])
    # the whole basis is tried even when its chunk was not near the best: chunks can be what is slow
    costs = {"big": 0.5, "big[chunk=64]": 4.0, "big[chunk=16]": 5.0, "small": 2.0}
    clock, calls = FakeClock(), []
    outcome = choose(pool, runner(clock, costs, calls=calls), clock=clock, settings=SETTINGS, tune=True,
                     chunk_first_above=100)
    assert outcome.winner.label == "big" and "big[chunk=16]" not in calls
    # without a limit (a GPU), or under it, the whole basis goes first
    clock, calls = FakeClock(), []
    choose(pool, runner(clock, costs, calls=calls), clock=clock, settings=SETTINGS, tune=True)
    assert calls[0] == "big"


def test_a_lucky_single_call_does_not_decide_when_each_call_takes_much_of_the_budget():
    # Calls take a quarter of the budget each: "b" and "c" are timed once after their warm-ups
    # before the budget is spent, and "c" was lucky that once (0.85 against its usual 1.2).
    clock = FakeClock()
    pool = [make("b", rank=0), make("c", rank=1), make("a", rank=2)]
    durations = {"b": [1.0], "c": [1.2, 0.85, 1.2], "a": [3.0]}  # call by call; the last one repeats
    calls = {label: 0 for label in durations}

    def run(candidate):
        sequence = durations[candidate.label]
        clock.t += sequence[min(calls[candidate.label], len(sequence) - 1)]
        calls[candidate.label] += 1
        return ANSWER

    outcome = choose(pool, run, clock=clock, settings=TuneSettings(budget=4.0), tune=True)
    assert outcome.winner.label == "b"
    assert outcome.samples["c"].seconds[:2] == pytest.approx([0.85, 1.2])  # its lucky call, then a confirming one
    assert len(outcome.samples["b"].seconds) >= 2
    assert clock.t <= 2 * 4.0 + 1.2  # one more budget at most (and the call that crossed it)


def test_the_whole_form_of_a_promising_strategy_first_tried_in_chunks_runs_even_past_the_budget():
    # Every first form takes much of the budget (a (512, 512 -> 512) Jacobian on a CPU): the chunked
    # form of "big" leads, and its whole form, faster still, must not be left untimed.
    pool = [make("big", memory=200, rank=0), make("big", memory=50, rank=0, chunk=64),
            make("slow", memory=200, rank=1), make("slow", memory=50, rank=1, chunk=64),
            make("other", memory=10, rank=2)]
    costs = {"big": 0.28, "big[chunk=64]": 0.35, "slow": 0.3, "slow[chunk=64]": 0.65, "other": 0.6}
    clock, calls = FakeClock(), []
    outcome = choose(pool, runner(clock, costs, calls=calls), clock=clock, settings=TuneSettings(budget=1.5),
                     tune=True, chunk_first_above=100)
    assert outcome.winner.label == "big"
    assert calls[:6] == ["big[chunk=64]"] * 2 + ["slow[chunk=64]"] * 2 + ["big"] * 2
    assert "tuning budget" in outcome.excluded["other"]  # the first forms spent the budget
    # "slow" was not within 1.5x of the best in chunks: its whole form gets no extra budget
    assert "slow" not in calls and "tuning budget" in outcome.excluded["slow"]
    assert clock.t <= 3 * 1.5 + 0.65  # the extension and the confirmation round: one more budget each at most
