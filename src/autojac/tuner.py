"""One tuning run: try candidates, time them side by side, cross-check results, pick the winner.

Candidates are data (a strategy, a chunk, a memory estimate, a heuristic rank) and running
one is the caller's `run(candidate)`, so tests give candidates known costs with a fake clock.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import FrameType

import torch
from torch import Tensor

from .errors import AutojacWarning, NoCandidateError
from .models import candidate_label, parse_label
from .numerics import agree
from .strategies.registry import Strategy
from .timing import Clock, Samples, TuneSettings, timed

# A candidate far behind the best on its first call is timed again anyway if that call took under this
# share of the budget.
CHEAP_RETIME = 0.02

log = logging.getLogger("autojac")


@dataclass(frozen=True)
class Candidate:
    """One strategy at one chunk size, with its memory estimate and heuristic rank."""

    strategy: Strategy
    chunk: int | None
    memory: int
    rank: int

    @property
    def label(self) -> str:
        return candidate_label(self.strategy.name, self.chunk)


@dataclass
class Outcome:
    """What tuning found: the winner, every timing, every exclusion."""

    winner: Candidate
    samples: dict[str, Samples]
    excluded: dict[str, str]
    result: Tensor | None = None  # the winner's result, with tuning off (it ran exactly once)
    verified: bool = False  # the winner's result agreed with one of the references (see `choose`)


def choose(pool: Sequence[Candidate], run: Callable[[Candidate], Tensor], *, clock: Clock,
           settings: TuneSettings, tune: bool, started: float | None = None,
           chunk_first_above: int | None = None, dtype: torch.dtype | None = None, order: int = 1,
           references: Collection[str] = ()) -> Outcome:
    """Try the candidates and pick the winner; see `_Tuning`. A strategy whose unchunked memory
    estimate is over `chunk_first_above` bytes is first tried at its largest chunk. Results are
    compared in `dtype` (the least precise the computation went through; each result's own by
    default) for derivatives of `order`; where they disagree, the group holding one of the
    `references` (candidate labels) is trusted, else the largest."""
    return _Tuning(pool, run, clock, settings, tune, started, chunk_first_above, dtype, order,
                   frozenset(references)).go()


@dataclass
class _ResultClass:
    """Candidates whose results agree with one representative result."""

    result: Tensor
    members: list[str] = field(default_factory=list)


class _Tuning:
    """One tuning run.

    1. Each strategy's first form in heuristic order: one warm-up call (its result is
       cross-checked against the others'), then one timed call; one already `drop_factor` times
       slower than the best so far is dropped. Errors and out-of-memory exclude a candidate with
       its reason. The first form is the unchunked one, or the largest chunk where the unchunked
       one did not fit or is estimated over `chunk_first_above` bytes.
    2. The other forms, for strategies within `chunk_margin` of the best or that did not fit,
       and the whole form of every strategy first tried in chunks: for one within
       `chunk_margin`, even when the first forms spent the budget, as far as one more allows.
    3. Timed rounds over the survivors, interleaved so that drift hits all alike, until each
       has its share of the budget or `max_repeats` calls; the median is kept.
    4. Confirmation: the finalists (within `confirm_margin` of the best, three at most) are timed
       again side by side until each has `confirm_repeats` calls, as far as one more budget
       allows: where a call takes a good part of the budget, steps 1-3 leave most candidates with
       a single timed call, and one lucky call (20-30% off on a busy machine) must not decide.
    5. Results that disagree with the majority are excluded. The fastest wins; medians within
       `tie_margin` of it tie, and ties go to the lower memory estimate, then the heuristic rank.
    With `tune` False, the first candidate that runs wins and nothing is timed.
    """

    def __init__(self, pool: Sequence[Candidate], run: Callable[[Candidate], Tensor], clock: Clock,
                 settings: TuneSettings, tune: bool, started: float | None, chunk_first_above: int | None = None,
                 dtype: torch.dtype | None = None, order: int = 1, references: frozenset[str] = frozenset()):
        self.pool, self.run, self.clock, self.settings, self.tune = list(pool), run, clock, settings, tune
        self.chunk_first_above = chunk_first_above
        self.dtype, self.order, self.references = dtype, order, references
        self.started = clock.now() if started is None else started
        self.samples: dict[str, Samples] = {}
        self.excluded: dict[str, str] = {}
        self.active: list[Candidate] = []  # survivors still being timed
        self.classes: list[_ResultClass] = []
        self.last_result: Tensor | None = None  # with tuning off, the answer itself
        self.unfit: set[str] = set()  # strategies that did not fit in memory unchunked
        self.chunked_first: set[str] = set()  # strategies first tried chunked for their size

    def go(self) -> Outcome:
        first, others = self._first_forms()
        for candidate in first:
            if self._warm_up(candidate) and not self.tune:
                return self._outcome(candidate)
        promising = self._promising()
        for candidate in others:
            # A whole basis first tried in chunks is tried whole too: the size estimate that put
            # its chunks first is an upper bound, and at small sizes chunks only add overhead.
            # For a promising strategy that holds even past the budget, within one more: where
            # every first form takes a good part of the budget, it would otherwise never run.
            whole = candidate.chunk is None and candidate.strategy.name in self.chunked_first
            worth = candidate.strategy.name in promising or whole
            budget = 2.0 if whole and candidate.strategy.name in promising else None  # times the budget
            if worth and self._warm_up(candidate, budget) and not self.tune:
                return self._outcome(candidate)
            if not worth:
                self.excluded[candidate.label] = (f"not timed: its first form was not within "
                                                  f"{self.settings.chunk_margin:g}x of the best")
        if not self.samples:
            raise NoCandidateError("result", self.excluded)
        self._rounds()
        self._confirm()
        return self._outcome(self._confirmed_winner())

    def _first_forms(self) -> tuple[list[Candidate], list[Candidate]]:
        """Each strategy's first form, and the other forms, both in pool (heuristic) order."""
        first: dict[str, Candidate] = {}
        for candidate in self.pool:  # a strategy's forms come unchunked first, then largest chunk first
            name = candidate.strategy.name
            if name not in first:
                first[name] = candidate
                if candidate.chunk is not None:  # its unchunked form was over the memory budget
                    self.unfit.add(name)
            elif first[name].chunk is None and candidate.chunk is not None and self._too_big_whole(first[name]):
                first[name] = candidate
                self.chunked_first.add(name)
        chosen = set(map(id, first.values()))
        return ([c for c in self.pool if id(c) in chosen], [c for c in self.pool if id(c) not in chosen])

    def _too_big_whole(self, candidate: Candidate) -> bool:
        return self.chunk_first_above is not None and candidate.memory > self.chunk_first_above

    def _spent(self) -> float:
        return self.clock.now() - self.started

    def _budget(self) -> float:
        """The budget: the settings', or for a cheap problem (its best call under `cheap_call`
        seconds) only `cheap_budget`: tuning must cost what it can save, tens of calls."""
        if self._best() < self.settings.cheap_call:
            return min(self.settings.budget, self.settings.cheap_budget)
        return self.settings.budget

    def _warm_up(self, candidate: Candidate, budget: float | None = None) -> bool:
        """Run once to check, once to time; True if the candidate survives.

        The budget (the settings' unless given) is checked before each candidate: none starts
        when less is left than the best time so far. A warm-up that spent the budget, or that
        was already far behind the best and not cheap (CHEAP_RETIME), is not repeated: its time
        stands as its one sample (an upper bound). A timed call over the drop factor is taken
        again before it drops the candidate.
        """
        label = candidate.label
        budget = self._budget() * (budget or 1.0)
        if self.tune and self.samples and budget - self._spent() < self._best():
            self.excluded[label] = (f"not timed: the tuning budget of {self._budget():g} s was spent "
                                    f"(AUTOJAC_TUNE_BUDGET; {self.settings.cheap_budget:g} s for calls under "
                                    f"{self.settings.cheap_call * 1e3:g} ms)")
            return False
        failure = ""
        try:
            result, seconds = timed(self.clock, lambda: self.run(candidate))
            if self.tune and self._worth_timing(seconds, budget, 2 * self.settings.drop_factor):
                _, seconds = timed(self.clock, lambda: self.run(candidate))
                if seconds > self.settings.drop_factor * self._best() and self._spent() < budget:
                    # a timing over the drop factor is taken again before it drops the candidate: one
                    # slow call (a busy moment) must not decide alone; the faster of the two stands
                    _, again = timed(self.clock, lambda: self.run(candidate))
                    seconds = min(seconds, again)
        except Exception as error:  # a failing candidate is data: excluded with its reason
            failure = describe_failure(error)
            del error
        log.debug("candidate %d of %d, %s: %s", self.pool.index(candidate) + 1, len(self.pool), label,
                  failure or f"{seconds * 1e3:.3g} ms ({self._spent():.2f} s into tuning)")
        if failure:
            self.excluded[label] = failure
            if failure.startswith("out of memory"):
                self.unfit.add(candidate.strategy.name)
                release_memory()
            return False
        if not self._join_class(label, result):
            return False
        if not self.tune:
            self.samples[label] = Samples()
            self.last_result = result
            return True
        self.samples[label] = Samples([seconds])
        if seconds > self.settings.drop_factor * self._best():
            log.debug("dropping %s: %.3g s is over %gx the best", label, seconds, self.settings.drop_factor)
        else:
            self.active.append(candidate)
        return True

    def _worth_timing(self, seconds: float, budget: float, factor: float) -> bool:
        """Whether a candidate whose last call took `seconds` is timed (again): budget left, and
        within `factor` of the best so far or cheap (under CHEAP_RETIME of the budget: a first
        call's one-time costs or a busy moment must not drop it unseen)."""
        if self._spent() >= budget:
            return False
        return seconds <= factor * self._best() or seconds < CHEAP_RETIME * budget

    def _join_class(self, label: str, result: Tensor) -> bool:
        if not (torch.is_tensor(result) or (isinstance(result, tuple) and all(map(torch.is_tensor, result)))):
            self.excluded[label] = f"returned {type(result).__name__}, not a tensor"
            return False
        for group in self.classes:
            if agree(result, group.result, self.dtype, self.order)[0]:
                group.members.append(label)
                return True
        if len(self.classes) >= 3:  # more than three different answers: keep no more copies
            self.excluded[label] = "disagrees with every other candidate"
            return False
        kept = tuple(r.detach() for r in result) if isinstance(result, tuple) else result.detach()
        self.classes.append(_ResultClass(kept, [label]))
        return True

    def _best(self) -> float:
        medians = [s.median for s in self.samples.values() if s.seconds]
        return min(medians) if medians else float("inf")

    def _promising(self) -> set[str]:
        best = self._best()
        near = {label for label, s in self.samples.items() if s.seconds and s.median <= self.settings.chunk_margin * best}
        return {parse_label(label)[0] for label in near} | self.unfit

    def _rounds(self) -> None:
        if not self.tune or not self.active:
            return
        share = max(self._budget() - self._spent(), 0.0) / len(self.active)
        active = list(self.active)
        while active and self._spent() < self._budget():
            for candidate in list(active):
                if not self._time_again(candidate):
                    active.remove(candidate)
                    continue
                samples = self.samples[candidate.label]
                enough = len(samples.seconds) >= self.settings.max_repeats or (
                    len(samples.seconds) >= self.settings.min_repeats and samples.total >= share)
                behind = len(samples.seconds) >= 3 and samples.median > self.settings.drop_factor * self._best()
                if enough or behind:
                    active.remove(candidate)

    def _confirm(self) -> None:
        if not self.tune:
            return
        best = self._best()
        measured = sorted((c for c in self.pool if self.samples.get(c.label) and self.samples[c.label].seconds),
                          key=lambda c: self.samples[c.label].median)
        finalists = [c for c in measured if self.samples[c.label].median <= self.settings.confirm_margin * best][:3]
        if len(finalists) < 2:
            return
        limit = max(self._spent(), self._budget()) + self._budget()
        while True:
            short = [c for c in finalists if len(self.samples[c.label].seconds) < self.settings.confirm_repeats]
            if not short or self._spent() + sum(self.samples[c.label].median for c in short) > limit:
                return
            for candidate in short:
                if not self._time_again(candidate):
                    finalists.remove(candidate)

    def _time_again(self, candidate: Candidate) -> bool:
        """One more timed call after the warm-up; a failure now (flaky) excludes it. True if timed."""
        try:
            _, seconds = timed(self.clock, lambda: self.run(candidate))
        except Exception as error:
            self.excluded[candidate.label] = describe_failure(error)
            del self.samples[candidate.label]
            return False
        self.samples[candidate.label].add(seconds)
        return True

    def _confirmed_winner(self) -> Candidate:
        """The winner, timed at least `confirm_repeats` times where one more budget allows and at
        least twice in any case: a plan is never decided by one timing of its winner. If the new
        timings dethrone it, the next winner is asked the same."""
        limit = max(self._spent(), self._budget()) + self._budget()
        if sum(1 for samples in self.samples.values() if samples.seconds) < 2:
            return self._winner()  # nothing it beat: no decision to confirm
        for _ in range(2 * len(self.pool)):
            winner = self._winner()
            samples = self.samples[winner.label]
            wanted = self.settings.confirm_repeats if self._spent() + samples.median <= limit else 2
            if len(samples.seconds) >= wanted or not self._time_again(winner):
                if winner.label in self.samples and len(self.samples[winner.label].seconds) >= wanted:
                    return winner
                continue  # it failed when timed again: excluded, ask the next
        return self._winner()

    def _winner(self) -> Candidate:
        by_label = {c.label: c for c in self.pool}
        majority = self._majority()
        timed_ok = [by_label[label] for label in self.samples if label in majority]
        if not timed_ok:
            raise NoCandidateError("result", self.excluded)
        best = min(self.samples[c.label].median for c in timed_ok)
        tied = [c for c in timed_ok if self.samples[c.label].median <= best * (1 + self.settings.tie_margin)]
        return min(tied, key=lambda c: (c.memory, c.rank, c.chunk is not None, c.chunk or 0))

    def _majority(self) -> set[str]:
        """Labels in the largest agreeing group; the others are excluded with a warning."""
        rank = {c.label: i for i, c in enumerate(self.pool)}
        groups = sorted(self.classes, key=lambda g: (not self.references.intersection(g.members), -len(g.members),
                                                     min(rank[m] for m in g.members)))
        winner, losers = groups[0], groups[1:]
        for group in losers:
            _, diff, allowed = agree(group.result, winner.result, self.dtype, self.order)
            for label in group.members:
                reason = (f"result disagrees with {winner.members[0]} by {diff:.3g} "
                          f"(allowed {allowed:.3g}); agreeing with it: {', '.join(winner.members)}")
                self.samples.pop(label, None)
                if label not in self.excluded:  # the winner may be asked for again: warn once
                    warnings.warn(f"autojac: candidate {label} excluded: {reason}", AutojacWarning,
                                  stacklevel=caller_stacklevel())
                self.excluded[label] = reason
        return set(winner.members)

    def _outcome(self, winner: Candidate) -> Outcome:
        group = next((g for g in self.classes if winner.label in g.members), None)
        verified = group is not None and bool(self.references.intersection(group.members))
        return Outcome(winner, self.samples, self.excluded, self.last_result, verified)


def caller_stacklevel() -> int:
    """The stacklevel that points a warning at the first frame outside autojac."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def describe_failure(error: BaseException) -> str:
    """One line for a candidate that raised; out-of-memory failures start with "out of memory"."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text.lower() \
            or "can't allocate memory" in text.lower():
        return f"out of memory: {type(error).__name__}: {text}"[:400]
    return f"{type(error).__name__}: {text}"[:400]


def release_memory() -> None:
    """Give memory back after an out-of-memory failure, before anything else runs."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


