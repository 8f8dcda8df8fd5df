"""The micro-benchmark harness: a clock that synchronizes the device, timed calls, statistics.

Tests inject a fake `Clock` to give candidates known costs without timing anything.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .models import Timing

T = TypeVar("T")

DEFAULT_BUDGET = 1.0  # seconds per plan, probes included; AUTOJAC_TUNE_BUDGET overrides


class Clock:
    """Wall clock; `sync` waits for queued device work so that a timing covers it."""

    def now(self) -> float:
        return time.perf_counter()

    def sync(self) -> None:
        pass


class CudaClock(Clock):
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else Clock()


def timed(clock: Clock, fn: Callable[[], T]) -> tuple[T, float]:
    """Run fn once: (its result, seconds), the device synchronized on both sides."""
    clock.sync()
    start = clock.now()
    result = fn()
    clock.sync()
    return result, clock.now() - start


@dataclass
class Samples:
    """Seconds of the timed calls of one candidate."""

    seconds: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)

    @property
    def total(self) -> float:
        return sum(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def summary(self) -> Timing:
        ordered = sorted(self.seconds)

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return Timing(median=self.median, p20=quantile(0.2), p80=quantile(0.8), repeats=len(ordered))


@dataclass(frozen=True)
class TuneSettings:
    """How hard to tune. `budget` is wall seconds per plan, probes and warm-ups included (for a cheap
    problem, `cheap_budget`)."""

    budget: float = DEFAULT_BUDGET
    drop_factor: float = 3.0  # a candidate this many times slower than the best is dropped
    tie_margin: float = 0.05  # medians within 5% of the fastest count as tied
    chunk_margin: float = 1.5  # chunked variants are tried for strategies within 1.5x of the best
    min_repeats: int = 5
    max_repeats: int = 200
    # Finalists (within this factor of the best, three at most) are timed again side by side until
    # each has `confirm_repeats` calls, within one more budget: a lucky single call must not decide.
    confirm_margin: float = 1.25
    confirm_repeats: int = 3
    # A problem whose best call takes under `cheap_call` seconds is tuned within `cheap_budget`
    # (probes included), so that its whole first call stays under 100 ms, 50 calls of 2 ms (fewer
    # calls' worth of anything cheaper would leave too few timings to tell strategies apart).
    cheap_call: float = 2e-3
    cheap_budget: float = 0.07

    @classmethod
    def from_env(cls) -> TuneSettings:
        """Defaults, with the budget from AUTOJAC_TUNE_BUDGET if set."""
        text = os.environ.get("AUTOJAC_TUNE_BUDGET", "").strip()
        if not text:
            return cls()
        try:
            budget = float(text)
        except ValueError:
            raise ValueError(
                f"AUTOJAC_TUNE_BUDGET={text!r} is not a number; expected seconds per plan, e.g. 1.0"
            ) from None
        if not budget > 0:
            raise ValueError(f"AUTOJAC_TUNE_BUDGET={text!r} must be positive (seconds per plan)")
        return cls(budget=budget, cheap_budget=budget)  # given explicitly: the budget of every plan


def compare(fns: Mapping[str, Callable[[], object]], clock: Clock | None = None, *, min_time: float = 0.2,
            max_repeats: int = 1000, warmup: int = 1, min_repeats: int = 1) -> dict[str, Samples]:
    """Time several functions side by side: warm-up, then interleaved rounds until each has run
    for `min_time` seconds and at least `min_repeats` times (or `max_repeats` times). Returns
    their samples, by name. `min_repeats` keeps one slow outlier (a busy machine) from ending
    a function's timing with a median of one or two samples. Each round runs them in a new order
    (seeded: the same every time), because a call is slower right after one that evicted the
    caches: in a fixed order a function always pays for the same neighbour."""
    clock = clock or Clock()
    for fn in fns.values():
        for _ in range(warmup):
            timed(clock, fn)
    samples = {name: Samples() for name in fns}
    active = dict(fns)
    order = random.Random(0)
    while active:
        names = list(active)
        order.shuffle(names)
        for name in names:
            _, seconds = timed(clock, active[name])
            taken = samples[name]
            taken.add(seconds)
            if (taken.total >= min_time and len(taken.seconds) >= min_repeats) or len(taken.seconds) >= max_repeats:
                del active[name]
    return samples
