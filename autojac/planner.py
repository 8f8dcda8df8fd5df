"""The planner: which strategies apply, in what order to try them, and which one wins.

Plans are memoized per signature in memory (the hot path is one dict lookup) and kept in
a `PlanStore`. On a miss the planner probes f once, lists the candidates that are valid for
it and fit in memory, and then either tunes (times them, cross-checks their results) or,
with tuning off, takes the first candidate in the heuristic order that runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import memory
from ._version import __version__
from .errors import NoCandidateError, NonDeterministicError
from .models import Plan, candidate_label, parse_label
from .numerics import agree
from .probes import Probes, run_probes
from .problem import Problem, Sizes
from .signature import Signature, describe
from .store import MemoryStore, PlanStore
from .strategies import registry
from .strategies.registry import BATCH_INDEPENDENT, VMAP, Strategy
from .timing import Clock, Samples, TuneSettings, clock_for, timed

log = logging.getLogger("autojac")


class AutojacWarning(UserWarning):
    """Something autojac worked around that the user may want to know about."""


def heuristic_order(op: str, sizes: Sizes) -> list[str]:
    """Strategy names for `op`, most promising first, before anything is measured; each family
    of strategies sets its table next to its strategies (`registry.set_heuristic`)."""
    return registry.heuristic(op, sizes)


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


def candidates(op: str, sizes: Sizes, probes: Probes, *, create_graph: bool, budget: int | None,
               problem: Problem | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates valid for f, in heuristic order (all chunks), and why the others are not.
    With `problem`, strategies that declare `applies` are asked whether they suit it."""
    order = heuristic_order(op, sizes)
    strategies = sorted(registry.for_op(op), key=lambda s: order.index(s.name))
    valid: list[Candidate] = []
    excluded: dict[str, str] = {}
    for rank, strategy in enumerate(strategies):
        reason = _invalid_reason(strategy, probes, create_graph, problem)
        for chunk in strategy.chunk_options(sizes):
            label = candidate_label(strategy.name, chunk)
            estimate = strategy.memory(sizes, chunk)
            if reason:
                excluded[label] = reason
            elif budget is not None and estimate > budget:
                excluded[label] = (f"needs about {memory.format_bytes(estimate)}, over the memory budget of "
                                   f"{memory.format_bytes(budget)} (half of what is free)")
            else:
                valid.append(Candidate(strategy, chunk, estimate, rank))
    return valid, excluded


def _invalid_reason(strategy: Strategy, probes: Probes, create_graph: bool, problem: Problem | None = None) -> str:
    if strategy.applies is not None and problem is not None:
        why = strategy.applies(problem)
        if why:
            return f"does not apply: {why}"
    if BATCH_INDEPENDENT in strategy.needs and not probes.batch_independent:
        return f"needs a batch-independent f, but {probes.coupling or 'batch_independent=False was given'}"
    if VMAP in strategy.needs and not probes.vmap_ok:
        return f"needs f to run under vmap, which failed: {probes.vmap_error}"
    if strategy.coupled_only and probes.batch_independent:
        return "not timed: it does B times the work; used only when f is batch-coupled"
    if create_graph and not strategy.differentiable:
        return "cannot return a differentiable result (create_graph=True)"
    return ""


def choose(pool: Sequence[Candidate], run: Callable[[Candidate], Tensor], *, clock: Clock,
           settings: TuneSettings, tune: bool, started: float | None = None) -> Outcome:
    """Try the candidates and pick the winner; see `_Tuning`."""
    return _Tuning(pool, run, clock, settings, tune, started).go()


@dataclass
class _ResultClass:
    """Candidates whose results agree with one representative result."""

    result: Tensor
    members: list[str] = field(default_factory=list)


class _Tuning:
    """One tuning run.

    1. Unchunked candidates in heuristic order: one warm-up call (its result is cross-checked
       against the others'), then one timed call; one already `drop_factor` times slower than
       the best so far is dropped. Errors and out-of-memory exclude a candidate with its reason.
    2. Chunked variants, for strategies within `chunk_margin` of the best or that did not fit.
    3. Timed rounds over the survivors, interleaved so that drift hits all alike, until each
       has its share of the budget or `max_repeats` calls; the median is kept.
    4. Results that disagree with the majority are excluded. The fastest wins; medians within
       `tie_margin` of it tie, and ties go to the lower memory estimate, then the heuristic rank.
    With `tune` False, the first candidate that runs wins and nothing is timed.
    """

    def __init__(self, pool: Sequence[Candidate], run: Callable[[Candidate], Tensor], clock: Clock,
                 settings: TuneSettings, tune: bool, started: float | None):
        self.pool, self.run, self.clock, self.settings, self.tune = list(pool), run, clock, settings, tune
        self.started = clock.now() if started is None else started
        self.samples: dict[str, Samples] = {}
        self.excluded: dict[str, str] = {}
        self.active: list[Candidate] = []  # survivors still being timed
        self.classes: list[_ResultClass] = []
        self.last_result: Tensor | None = None  # with tuning off, the answer itself
        self.fitted: set[str] = set()  # strategies whose unchunked run failed for memory

    def go(self) -> Outcome:
        unchunked = [c for c in self.pool if c.chunk is None]
        chunked = [c for c in self.pool if c.chunk is not None]
        # A strategy whose every unchunked form was over budget starts at its chunks.
        no_whole = {c.strategy.name for c in chunked} - {c.strategy.name for c in unchunked}
        self.fitted |= no_whole
        for candidate in unchunked:
            if self._warm_up(candidate) and not self.tune:
                return self._outcome(candidate)
        promising = self._promising()
        for candidate in chunked:
            if candidate.strategy.name in promising and self._warm_up(candidate) and not self.tune:
                return self._outcome(candidate)
            if candidate.strategy.name not in promising:
                self.excluded[candidate.label] = "not timed: its unchunked form was well behind the best"
        if not self.samples:
            raise NoCandidateError("result", self.excluded)
        self._rounds()
        return self._outcome(self._winner())

    def _spent(self) -> float:
        return self.clock.now() - self.started

    def _warm_up(self, candidate: Candidate) -> bool:
        """Run once to check, once to time; True if the candidate survives."""
        label = candidate.label
        if self.tune and self.samples and self._spent() > self.settings.budget:
            self.excluded[label] = (f"not timed: the tuning budget of {self.settings.budget:g} s was spent "
                                    f"(AUTOJAC_TUNE_BUDGET)")
            return False
        failure = ""
        try:
            result, _ = timed(self.clock, lambda: self.run(candidate))
            if self.tune:
                _, seconds = timed(self.clock, lambda: self.run(candidate))
        except Exception as error:  # a failing candidate is data: excluded with its reason
            failure = _describe_failure(error)
            del error
        if failure:
            self.excluded[label] = failure
            if failure.startswith("out of memory"):
                self.fitted.add(candidate.strategy.name)
                _release_memory()
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

    def _join_class(self, label: str, result: Tensor) -> bool:
        if not torch.is_tensor(result):
            self.excluded[label] = f"returned {type(result).__name__}, not a tensor"
            return False
        for group in self.classes:
            if agree(result, group.result)[0]:
                group.members.append(label)
                return True
        if len(self.classes) >= 3:  # more than three different answers: keep no more copies
            self.excluded[label] = "disagrees with every other candidate"
            return False
        self.classes.append(_ResultClass(result.detach(), [label]))
        return True

    def _best(self) -> float:
        medians = [s.median for s in self.samples.values() if s.seconds]
        return min(medians) if medians else float("inf")

    def _promising(self) -> set[str]:
        best = self._best()
        near = {label for label, s in self.samples.items() if s.seconds and s.median <= self.settings.chunk_margin * best}
        return {parse_label(label)[0] for label in near} | self.fitted

    def _rounds(self) -> None:
        if not self.tune or not self.active:
            return
        share = max(self.settings.budget - self._spent(), 0.0) / len(self.active)
        active = list(self.active)
        while active and self._spent() < self.settings.budget:
            for candidate in list(active):
                samples = self.samples[candidate.label]
                try:
                    _, seconds = timed(self.clock, lambda: self.run(candidate))
                except Exception as error:  # flaky failure after warm-up: exclude it too
                    self.excluded[candidate.label] = _describe_failure(error)
                    del self.samples[candidate.label]
                    active.remove(candidate)
                    continue
                samples.add(seconds)
                enough = len(samples.seconds) >= self.settings.max_repeats or (
                    len(samples.seconds) >= self.settings.min_repeats and samples.total >= share)
                behind = len(samples.seconds) >= 3 and samples.median > self.settings.drop_factor * self._best()
                if enough or behind:
                    active.remove(candidate)

    def _winner(self) -> Candidate:
        by_label = {c.label: c for c in self.pool}
        majority = self._majority()
        timed_ok = [by_label[label] for label in self.samples if label in majority]
        best = min(self.samples[c.label].median for c in timed_ok)
        tied = [c for c in timed_ok if self.samples[c.label].median <= best * (1 + self.settings.tie_margin)]
        return min(tied, key=lambda c: (c.memory, c.rank, c.chunk is not None, c.chunk or 0))

    def _majority(self) -> set[str]:
        """Labels in the largest agreeing group; the others are excluded with a warning."""
        rank = {c.label: i for i, c in enumerate(self.pool)}
        groups = sorted(self.classes, key=lambda g: (-len(g.members), min(rank[m] for m in g.members)))
        winner, losers = groups[0], groups[1:]
        for group in losers:
            _, diff, allowed = agree(group.result, winner.result)
            for label in group.members:
                reason = (f"result disagrees with {winner.members[0]} by {diff:.3g} "
                          f"(allowed {allowed:.3g}); agreeing with it: {', '.join(winner.members)}")
                self.excluded[label] = reason
                self.samples.pop(label, None)
                warnings.warn(f"autojac: candidate {label} excluded: {reason}", AutojacWarning,
                              stacklevel=_caller_stacklevel())
        return set(winner.members)

    def _outcome(self, winner: Candidate) -> Outcome:
        return Outcome(winner, self.samples, self.excluded, self.last_result)


def _caller_stacklevel() -> int:
    """The stacklevel that points a warning at the first frame outside autojac."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _describe_failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text.lower() \
            or "can't allocate memory" in text.lower():
        return f"out of memory: {type(error).__name__}: {text}"[:400]
    return f"{type(error).__name__}: {text}"[:400]


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def preserved_buffers(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Restore every buffer (BatchNorm's running statistics, say) after tuning has run f."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def check_devices(modules: Sequence[nn.Module], x: Tensor) -> None:
    """Refuse an f whose parameters live on another device than x, naming both."""
    for module in modules:
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.device != x.device:
                raise ValueError(
                    f"x is on {x.device} but f's parameter {type(module).__name__}.{name} is on "
                    f"{parameter.device}; move x with x.to('{parameter.device}') or the model with "
                    f"model.to('{x.device}')"
                )


class Planner:
    """Plans per signature: memoized, stored, made on a miss; one tuning per signature at a time."""

    def __init__(self, store: PlanStore | None = None, clock: Callable[[torch.device], Clock] = clock_for):
        self.store: PlanStore = store if store is not None else MemoryStore()
        self.clock = clock
        self._hot: dict[Signature, Plan] = {}
        self._probes: dict[Signature, Probes] = {}
        self._locks: dict[Signature, threading.Lock] = {}
        self._guard = threading.Lock()

    def cached(self, sig: Signature) -> Plan | None:
        """The plan for sig from memory, else from the store; None on a miss."""
        plan = self._hot.get(sig)
        if plan is None:
            plan = self.store.get(sig.key)
            if plan is not None:
                self._hot[sig] = plan
        return plan

    def forget(self) -> None:
        """Drop every memoized plan and probe (the store is left alone)."""
        self._hot.clear()
        self._probes.clear()

    def plan(self, sig: Signature, problem: Problem, *, tune: bool,
             settings: TuneSettings | None = None) -> tuple[Plan, Tensor | None]:
        """Make (or wait for) the plan for sig; also the result when the planning computed it."""
        with self._lock_for(sig):
            plan = self.cached(sig)
            if plan is not None and (plan.tuned or not tune):
                return plan, None
            return self._make(sig, problem, tune, settings or TuneSettings.from_env())

    def probes(self, sig: Signature, problem: Problem) -> Probes:
        """Probe f once per signature (the operation and create_graph do not matter)."""
        key = dataclasses.replace(sig, op="", create_graph=False)
        found = self._probes.get(key)
        if found is None:
            modules = describe(problem.f).modules()
            check_devices(modules, problem.x)
            with preserved_buffers(modules):
                found = run_probes(problem.f, problem.x, sig.batch_independent)
            self._probes[key] = found
        return found

    def forced(self, sig: Signature, problem: Problem, label: str) -> tuple[Strategy, int | None]:
        """The strategy the caller named, checked against what the probes found."""
        name, chunk = parse_label(label)
        strategy = registry.get(name, problem.op)
        probes = self.probes(sig, problem)
        reason = _invalid_reason(strategy, probes, problem.create_graph, problem)
        if reason and not reason.startswith("not timed"):
            hint = ""
            if BATCH_INDEPENDENT in strategy.needs and not probes.batch_independent:
                hint = ("; use strategy='auto' (or a strategy without that need, such as 'full_diag'), or pass "
                        "batch_independent=True if you know the outputs do not mix samples")
            raise ValueError(f"strategy {label!r} cannot be used for this f: it {reason}{hint}")
        return strategy, chunk

    def _lock_for(self, sig: Signature) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sig, threading.Lock())

    def _make(self, sig: Signature, problem: Problem, tune: bool, settings: TuneSettings) -> tuple[Plan, Tensor | None]:
        if tune:
            _warm_transforms()
        clock = self.clock(problem.x.device)
        started = clock.now()
        wall = time.perf_counter()
        probes = self.probes(sig, problem)
        if not probes.deterministic:
            raise NonDeterministicError(
                f"f is not deterministic: {probes.nondeterminism}. autojac compares strategies by running "
                f"f several times, which needs the same output for the same input. If f is a model with "
                f"dropout or other random layers, call model.eval() first; to differentiate one random "
                f"draw anyway, name a strategy, e.g. strategy='sum_rev'"
            )
        sizes = Sizes(batch=sig.batch, n=problem.n, m=_numel(probes.out_shape),
                      itemsize=problem.x.element_size(), activations=probes.activations,
                      create_graph=sig.create_graph)
        budget = memory.budget_bytes(problem.x.device)
        pool, excluded = candidates(sig.op, sizes, probes, create_graph=sig.create_graph, budget=budget,
                                    problem=problem)
        if not pool:
            raise NoCandidateError(sig.op, excluded)
        backward = _BackwardPass() if tune and sig.create_graph else None

        def run(candidate: Candidate) -> Tensor:
            result = candidate.strategy(problem, candidate.chunk)
            if backward is not None:  # with create_graph the user pays for a backward pass too
                backward(result)
            return result

        with preserved_buffers(describe(problem.f).modules()):
            try:
                outcome = choose(pool, run, clock=clock, settings=settings, tune=tune, started=started)
            except NoCandidateError as error:
                raise NoCandidateError(sig.op, {**excluded, **error.reasons}) from None
        samples = {label: s for label, s in outcome.samples.items() if s.seconds}
        plan = Plan(
            key=sig.key, op=sig.op, strategy=outcome.winner.strategy.name, chunk=outcome.winner.chunk,
            timings={label: s.median for label, s in samples.items()},
            spread={label: s.summary() for label, s in samples.items()},
            excluded={**excluded, **outcome.excluded},
            memory={c.label: c.memory for c in pool},
            tuned=tune, batch_independent=probes.batch_independent, vmap_ok=probes.vmap_ok,
            deterministic=probes.deterministic, batch_size=sig.batch, in_shape=sig.in_shape,
            out_shape=probes.out_shape, dtype=sig.dtype, device=sig.device, device_name=sig.device_name,
            create_graph=sig.create_graph, fn_name=sig.fn_name, fingerprint=sig.fingerprint,
            torch_version=sig.torch_version, autojac_version=__version__, threads=torch.get_num_threads(),
            tuning_seconds=time.perf_counter() - wall,
        )
        self._hot[sig] = plan
        self.store.put(plan)
        if tune:
            log.info("tuned %s of %s [B=%d in=%s out=%s] in %.2f s: %s won (%d timed, %d excluded)",
                     sig.op, sig.fn_name, sig.batch, sig.in_shape, plan.out_shape, plan.tuning_seconds,
                     plan.label, len(plan.timings), len(plan.excluded))
        else:
            log.info("chose %s for %s of %s by heuristic (tuning off)", plan.label, sig.op, sig.fn_name)
        return plan, outcome.result


class _BackwardPass:
    """A backward pass of a scalar loss through a result, into the leaves its graph reaches (found
    once, on the first untimed call), without touching anyone's .grad."""

    def __init__(self) -> None:
        self.leaves: list[Tensor] | None = None

    def __call__(self, result: Tensor) -> None:
        if not result.requires_grad:
            return
        if self.leaves is None:
            self.leaves = _graph_leaves(result)
        if self.leaves:
            torch.autograd.grad(result.sum(), self.leaves, allow_unused=True)


def _graph_leaves(result: Tensor) -> list[Tensor]:
    """The tensors requiring grad that result's graph ends in (parameters, x or its sources)."""
    leaves: dict[int, Tensor] = {}
    seen: dict[int, object] = {}  # holds the nodes too, so that no id is reused meanwhile
    stack = [result.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if isinstance(variable, Tensor):
            leaves[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(leaves.values())


@functools.lru_cache(maxsize=1)
def _warm_transforms() -> None:
    """Pay torch.func's one-time start-up (over a second for the first vjp) outside any budget."""
    x = torch.ones(2, 1)
    with torch.no_grad():
        _, pullback = torch.func.vjp(torch.sin, x)
        torch.func.vmap(pullback)(torch.ones(1, 2, 1))
        torch.func.vmap(lambda t: torch.func.jvp(torch.sin, (x,), (t,)))(torch.ones(1, 2, 1))


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


_default: Planner | None = None
_default_guard = threading.Lock()


def default_planner() -> Planner:
    """The process-wide planner that the public functions use."""
    global _default
    if _default is None:
        with _default_guard:
            if _default is None:
                _default = Planner()
    return _default


def set_default_planner(planner: Planner) -> Planner:
    """Replace the process-wide planner (tests, other stores); returns the old one."""
    global _default
    with _default_guard:
        old, _default = _default, planner
    return old or Planner()
