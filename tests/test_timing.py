"""The side-by-side timing harness, with a fake clock."""

from autojac.timing import Clock, compare


class FakeClock(Clock):
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def test_compare_rotates_the_order_and_honours_min_repeats():
    clock, calls = FakeClock(), []

    def costing(name, seconds):
        def run():
            calls.append(name)
            clock.t += seconds
        return run

    fns = {"a": costing("a", 1.0), "b": costing("b", 1.0), "c": costing("c", 1.0)}
    samples = compare(fns, clock, min_time=0.5, min_repeats=4, warmup=1)
    assert {name: len(s.seconds) for name, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    rounds = [calls[i:i + 3] for i in range(3, len(calls), 3)]  # after the warm-up round
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]  # no function always runs after the same one
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert samples["a"].median == 1.0
