"""The side-by-side timing harness, with a fake clock."""

from autojac.timing import Clock, compare


class FakeClock(Clock):
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


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
