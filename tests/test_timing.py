"""The side-by-side timing harness (autojac.timing.compare), with a fake clock."""

import pytest

from autojac.timing import compare

from test_planner import FakeClock


def _costs(clock: FakeClock, seconds: list[float]):
    """A function whose successive calls take these many (fake) seconds, the last one forever after."""
    calls = iter(seconds)
    last = seconds[-1]

    def fn() -> None:
        nonlocal last
        last = next(calls, last)
        clock.t += last

    return fn


def test_an_outlier_does_not_end_the_timing_before_min_repeats():
    clock = FakeClock()
    # warm-up 1 ms, then one 50 ms outlier (a busy machine), then 1 ms calls.
    fns = {"spiky": _costs(clock, [0.001, 0.050, 0.001]), "steady": _costs(clock, [0.002])}
    samples = compare(fns, clock, min_time=0.01, min_repeats=5)
    assert len(samples["spiky"].seconds) == 5
    assert samples["spiky"].median == pytest.approx(0.001)
    assert len(samples["steady"].seconds) == 5  # 5 x 2 ms reaches min_time too


def test_without_min_repeats_min_time_alone_ends_the_timing():
    clock = FakeClock()
    samples = compare({"spiky": _costs(clock, [0.001, 0.050, 0.001])}, clock, min_time=0.01)
    assert samples["spiky"].seconds == [0.050]
    samples = compare({"slow": _costs(clock, [1.0])}, clock, min_time=0.01, min_repeats=3, max_repeats=2)
    assert len(samples["slow"].seconds) == 2  # max_repeats still caps it


def test_compare_shuffles_each_round_and_honours_min_repeats():
    clock, calls = FakeClock(), []

    def costing(name, seconds):
        def run():
            calls.append(name)
            clock.t += seconds
        return run

    fns = {name: costing(name, 1.0) for name in "abcd"}
    samples = compare(fns, clock, min_time=0.5, min_repeats=12, warmup=1)
    assert {name: len(s.seconds) for name, s in samples.items()} == dict.fromkeys("abcd", 12)
    rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]  # after the warm-up round
    assert all(sorted(r) == list("abcd") for r in rounds)
    # no function always runs right after the same one
    before_a = {r[r.index("a") - 1] for r in rounds if r.index("a") > 0}
    assert len(before_a) > 1
    assert samples["a"].median == 1.0
    calls.clear()
    compare(fns, clock, min_time=0.5, min_repeats=12, warmup=1)
    assert [calls[i:i + 4] for i in range(4, len(calls), 4)] == rounds  # seeded: the same order every time
