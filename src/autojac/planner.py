"""The planner: which strategies apply, in what order to try them, which one wins, and serving it.

Plans are memoized per signature in memory and kept in a `PlanStore` (by default the disk cache
of cache.py), which is asked only on a miss. On a miss the planner first looks for a tuned plan
of the same signature at a batch size within a factor of 2 (no timing: a new DataLoader batch
size costs a lookup); else it probes f once, lists the candidates that are valid for it and fit
in memory, and either tunes (times them, cross-checks their results) or, with tuning off, takes
the first candidate in the heuristic order that runs. With AUTOJAC_REQUIRE_PLAN=1 a miss is an
error instead.

A plan is served to an f through an `Entry`, kept weakly per f and per what a call looks like at
a glance (operation, x's shape, dtype, device, layout, options): the hot path is a dict lookup,
the guards of f's description (signature.Guards) and the strategy. Whether a plan may be served
at all is trust.py's to say: a plan this process did not tune is cross-checked once, and batch
independence is re-checked at spaced calls.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from . import cache, calls, compiled, config, distributed, memory, trust
from ._version import __version__
from .buffers import BufferSnapshot, preserved_buffers
from .errors import AutojacWarning, NoCandidateError, NonDeterministicError, PlanRequiredError
from .models import Plan, candidate_label, parse_label
from .numerics import computation_dtype
from .probes import Probes, quick_coupling, run_probes
from .problem import BatchedFn, Problem, Sizes
from .signature import FnInfo, Signature, WeakTable, describe, weak_slot
from .store import MemoryStore, PlanStore
from .strategies import registry
from .strategies.registry import BATCH_INDEPENDENT, VMAP, Strategy, normal_tensor
from .timing import Clock, TuneSettings, clock_for
from .tuner import Candidate, caller_stacklevel, choose

if TYPE_CHECKING:
    from datetime import datetime

log = logging.getLogger("autojac")

# A tuned plan serves another batch size of the same signature within this factor, untimed.
BATCH_REUSE_FACTOR = 2.0
# The cost model: a candidate whose work (passes over f) is this many times the least, and whose
# passes move more than PRUNE_ABOVE_BYTES of activations (so that their cost is compute, not
# per-call overhead, which the model does not see), cannot win and is not timed.
PRUNE_FACTOR = 8.0
PRUNE_ABOVE_BYTES = 16 * 2**20
# New f objects whose ints bound when made differ from the last ones are checked this many times for
# a plan; after that the ints are taken for data (a diffusion sampler's step).
FIXED_CHECKS = 3
# A glance is (op, x.shape, x.dtype, x.device, x.layout, create_graph, batch_independent, tune, ...).
GLANCE_TUNE = 7
# Operations whose strategies differentiate once (unless create_graph).
FIRST_ORDER = frozenset({"jacobian", "divergence"})


def heuristic_order(op: str, sizes: Sizes) -> list[str]:
    """Strategy names for `op`, most promising first, before anything is measured; each family
    of strategies sets its table next to its strategies (`registry.set_heuristic`)."""
    return registry.heuristic(op, sizes)


def candidates(op: str, sizes: Sizes, probes: Probes, *, create_graph: bool, budget: int | None,
               problem: Problem | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates valid for f, in heuristic order (all chunks), and why the others are not.
    With `problem`, strategies that declare `applies` are asked whether they suit it."""
    order = heuristic_order(op, sizes)
    strategies = sorted(registry.for_op(op), key=lambda s: order.index(s.name))
    valid: list[Candidate] = []
    excluded: dict[str, str] = {}
    least = _least_work(strategies, sizes, probes, create_graph, problem)
    for rank, strategy in enumerate(strategies):
        reason = _invalid_reason(strategy, probes, create_graph, problem) or _beyond_reach(strategy, sizes, least)
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


def _least_work(strategies: list[Strategy], sizes: Sizes, probes: Probes, create_graph: bool,
                problem: Problem | None) -> float | None:
    """The least work (strategy.work) of the strategies valid for f, None if none estimates it."""
    estimates = [s.work(sizes) for s in strategies
                 if s.work is not None and not _invalid_reason(s, probes, create_graph, problem)]
    return min(estimates) if estimates else None


def _beyond_reach(strategy: Strategy, sizes: Sizes, least: float | None) -> str:
    """Why a strategy cannot win by the cost model (its passes over f against the least), or ""."""
    if strategy.work is None or least is None:
        return ""
    work = strategy.work(sizes)
    if work <= PRUNE_FACTOR * least or work * sizes.activations <= PRUNE_ABOVE_BYTES:
        return ""
    return (f"not timed: it makes {work:g} passes' worth of vector products over f where another makes "
            f"{least:g} (cost model: over {PRUNE_FACTOR:g}x cannot win)")


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


def _memory_hint(reasons: dict[str, str], batch: int) -> str:
    if not any("memory" in why for why in reasons.values()):
        return ""
    piece = max(1, batch // 4)
    return (f"Candidates that suit f need more memory than is free. Try a smaller batch: split x into "
            f"pieces (torch.split(x, {piece})) and concatenate the results with torch.cat")


def check_devices(modules: list[nn.Module], x: Tensor) -> None:
    """Refuse an f whose parameters live on another device than x, naming both."""
    for module in modules:
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.device != x.device:
                raise ValueError(
                    f"x is on {x.device} but f's parameter {type(module).__name__}.{name} is on "
                    f"{parameter.device}; move x with x.to('{parameter.device}') or the model with "
                    f"model.to('{x.device}')"
                )


class Served:
    """The plan served for one signature, shared by the entries of every f and call shape that have
    it, so that the schedule of its checks (trust.py) counts every call, whichever f object makes
    it (a lambda made anew at each step too), and a plan made again serves every entry at once."""

    __slots__ = ("plan", "strategy", "chunk", "calls", "next_check", "generation", "lock", "fixed", "fixed_changes",
                 "exact_norms")

    def __init__(self, sig: Signature, plan: Plan) -> None:
        self.calls = 0
        self.generation = 0
        self.lock = threading.Lock()
        self.fixed: tuple[int, ...] | None = None  # the ints f was made with (FnInfo.fixed) when last checked
        self.fixed_changes = 0
        self.exact_norms = False  # Planner.exact: calls run f's fused normalizations as plain operations
        self.rebind(sig, plan)

    def rebind(self, sig: Signature, plan: Plan) -> None:
        """Serve `plan` from now on (a plan made again after a check failed)."""
        self.plan = plan
        self.strategy = registry.get(plan.strategy, plan.op)
        self.chunk = plan.chunk
        self.generation += 1
        # nothing to re-check where the caller asserted batch_independent, or f is coupled already
        watched = sig.batch_independent is None and plan.batch_independent
        self.next_check = trust.next_check(self.calls) if watched else math.inf


class Entry:
    """What serves one f for the calls that look alike: its description's guards and the plan
    served for its signature (see the module docstring)."""

    __slots__ = ("served", "guards", "sig", "info", "planner", "tune", "pending", "verify", "__weakref__")

    def __init__(self, planner: Planner, sig: Signature, info: FnInfo, served: Served, tune: bool | None) -> None:
        self.planner, self.sig, self.info, self.served, self.tune = planner, sig, info, served, tune
        self.guards = info.guards
        self.pending = False  # check batch independence on this entry's next call
        self.verify = False  # and cross-check the plan then

    @property
    def plan(self) -> Plan:
        return self.served.plan

    def __call__(self, problem: Problem) -> Tensor:
        served = self.served
        served.calls += 1
        if served.exact_norms:
            problem = problem.replace(exact_norms=True)
        if served.calls >= served.next_check or self.pending:
            return self.planner.recheck(self, problem)
        return served.strategy(problem, served.chunk)


class Planner:
    """Plans per signature: memoized, stored, made on a miss; one tuning per signature at a time."""

    def __init__(self, store: PlanStore | None = None, clock: Callable[[torch.device], Clock] = clock_for):
        self.store: PlanStore = store if store is not None else MemoryStore()
        self.clock = clock
        self._hot: dict[Signature, Plan] = {}
        self._families: dict[str, dict[int, Plan]] = {}  # Signature.family -> batch size -> tuned plan
        self._trusted: set[str] = set()  # keys whose plans were tuned or cross-checked in this process
        self._made: set[str] = set()  # keys whose plans this process made (probing f)
        # f -> {(name, glance): Entry}
        self._entries = WeakTable()
        self._probes: dict[Signature, Probes] = {}
        self._fused_norms: dict[str, str] = {}  # Signature.family -> Probes.fused_norm
        self._served: dict[Signature, Served] = {}  # the plan served per signature, and its schedule of checks
        self._locks: dict[Signature, threading.Lock] = {}
        self._guard = threading.Lock()
        self._generator = torch.Generator().manual_seed(0x5EED)

    # -- the hot path ---------------------------------------------------------------------------

    def serve(self, f: BatchedFn, glance: tuple[object, ...]) -> Entry | None:
        """The entry remembered for f and calls that look like `glance`, if f's description still
        holds (nothing it was made from was rebound); None: take the slow path (`entry`)."""
        slot, name = weak_slot(f, self._entries, make=False)
        entry = slot.get((name, glance)) if slot is not None else None
        if entry is None or not entry.guards.hold():
            return None
        if entry.plan.tuned is False and glance[GLANCE_TUNE] is None and config.tuning_enabled(None):
            return None  # a heuristic plan, and tuning was switched on since
        if distributed.group_started():  # a plan made before the group existed must reach it too
            distributed.publish(entry.plan)
        return entry

    # -- the slow path --------------------------------------------------------------------------

    def entry(self, problem: Problem, sig: Signature, info: FnInfo, tune: bool | None,
              glance: tuple[object, ...] | None = None,
              owner: BatchedFn | None = None) -> tuple[Entry, Tensor | None]:
        """The entry serving this call (made, found by batch size, or read; checked if this process
        did not tune it), remembered for `glance` under `owner`, the f the caller passed (`serve`
        looks it up by that f: problem.f may wrap it anew on every call); and the result when making
        the plan computed it."""
        tuning = config.tuning_enabled(tune)
        problem = self.exact(sig, problem)
        plan = self.cached(sig, problem)
        result, made = None, False
        if plan is None:
            plan = self.nearby(sig, problem)
        if plan is None or (not plan.tuned and tuning):
            plan, result = self.plan(sig, problem, tune=tuning)
            made = True
        checked_here = sig.key in self._trusted
        if not checked_here:
            checked = self._cross_checked(sig, info, plan, problem, tuning)
            if checked is not plan:  # the plan changed: its result must come from the new plan
                plan, result = checked, None
        served = self._served_for(sig, plan)
        served.exact_norms = problem.exact_norms
        entry = Entry(self, sig, info, served, tune)
        owner = owner if owner is not None else problem_f(problem)
        slot, name = weak_slot(owner, self._entries, make=True) if glance is not None else (None, None)
        rebound = slot is not None and (name, glance) in slot  # something f reads changed since its last call
        # Ints bound when f was made are data to the key (a diffusion step), but may be structure (a
        # dim): a new f whose ints differ is checked, until a few such changes proved them data.
        new_ints = served.fixed is not None and info.fixed != served.fixed and served.fixed_changes < FIXED_CHECKS
        if new_ints:
            served.fixed_changes += 1
        served.fixed = info.fixed
        if not made and (not checked_here or info.holds_tensors or rebound or new_ints) \
                and served.next_check < math.inf:
            # Batch independence was probed on another f, in another process, or before what the key
            # leaves out (tensors, numbers) changed: check it on this call; where what f reads was
            # rebound, whether the plan still agrees with the reference too.
            entry.pending = True
            entry.verify = rebound and info.data_changes <= 1
        if slot is not None:
            slot[(name, glance)] = entry
        return entry, result

    def _served_for(self, sig: Signature, plan: Plan) -> Served:
        """The Served of sig, serving `plan` (made, or rebound if the plan changed)."""
        with self._guard:
            served = self._served.get(sig)
            if served is None:
                served = self._served[sig] = Served(sig, plan)
            elif served.plan is not plan:
                served.rebind(sig, plan)
            return served

    def cached(self, sig: Signature, problem: Problem | None = None) -> Plan | None:
        """The plan for sig from memory, else from the store (if its strategy still serves the
        problem); None on a miss."""
        plan = self._hot.get(sig)
        if plan is not None:
            if distributed.group_started():  # a plan made before the group existed must reach it too
                distributed.publish(plan)
        else:
            plan = self.store.get(sig.key)
            if plan is not None and not _describes(plan, sig):
                log.warning("ignoring the stored plan %s: it does not describe %s of %s [B=%d in=%s %s %s]",
                            sig.key, sig.op, sig.fn_name, sig.batch, sig.in_shape, sig.dtype, sig.device)
                plan = None
            if plan is not None and _unsuitable(plan, sig, problem):
                plan = None
            if plan is not None:
                self._memoize(sig, plan)
                distributed.publish(plan)
        return plan

    def plan(self, sig: Signature, problem: Problem, *, tune: bool, settings: TuneSettings | None = None,
             exclude: dict[str, str] | None = None, fresh: bool = False,
             again: bool = False) -> tuple[Plan, Tensor | None]:
        """Make (or wait for) the plan for sig; also the result when the planning computed it. With
        `exclude` (labels -> reasons) those candidates are left out; with `fresh` a plan reused from
        another batch size does not count as made; with `again` no stored plan does (a check found
        the old one wrong for f)."""
        with self._lock_for(sig):
            plan = self.cached(sig, problem) if not (exclude or again) else None
            if plan is not None and fresh and plan.tuned_batch is not None:
                plan = None
            follower = distributed.is_follower()
            required = config.plan_required() and not again  # a check found the stored plan wrong: make one
            if plan is not None and (plan.tuned or not tune or follower or required):
                return plan, None
            if required:
                error = PlanRequiredError(missing_plan_message(sig, self.store))
                error.sig, error.store = sig, self.store
                raise error
            if follower:  # rank 0 decides; only when it cannot be heard from does this rank choose
                plan, why = distributed.fetch(sig.key, sig.op)
                if plan is not None:
                    self._memoize(sig, plan)
                    return plan, None
                warnings.warn(f"autojac: {why}; using the heuristic choice for {sig.op} of {sig.fn_name}",
                              AutojacWarning, stacklevel=caller_stacklevel())
                return self._make(sig, problem, False, settings or TuneSettings.from_env(), persist=False)
            plan, result = self._make(sig, problem, tune, settings or TuneSettings.from_env(), exclude=exclude)
            distributed.publish(plan)
            return plan, result

    def exact(self, sig: Signature, problem: Problem) -> Problem:
        """The problem, with f's fused normalizations run as plain operations where the result keeps
        its graph (norms.py: their derivatives beyond second order are wrong in PyTorch), and for
        GroupNorm at second order (its batched double backward fails on a reshape, its backward has
        no forward-mode derivative)."""
        if problem.exact_norms or sig.op in FIRST_ORDER and not sig.create_graph:
            return problem
        fused = self._fused_norms.get(sig.family)
        if fused is None:  # the same at every batch size: a new one is not probed for it
            fused = self._fused_norms[sig.family] = self.probes(sig, problem).fused_norm
        if fused and (sig.create_graph or fused == "NativeGroupNorm"):
            return problem.replace(exact_norms=True)
        return problem

    def probes(self, sig: Signature, problem: Problem) -> Probes:
        """Probe f once per signature (the operation and create_graph do not matter)."""
        key = dataclasses.replace(sig, op="", create_graph=False)
        found = self._probes.get(key)
        if found is None:
            modules = describe(problem_f(problem)).modules()
            check_devices(modules, problem.x)
            with preserved_buffers(modules):
                found = run_probes(problem.f, problem.x, sig.batch_independent, problem)
            self._probes[key] = found
        return found

    def forced(self, sig: Signature, problem: Problem, label: str) -> tuple[Strategy, int | None]:
        """The strategy the caller named, checked against what the probes found."""
        name, chunk = parse_label(label)
        strategy = registry.get(name, problem.op)
        registry.check_chunk(strategy, chunk, label)
        probes = self.probes(sig, problem)
        reason = _invalid_reason(strategy, probes, problem.create_graph, problem)
        if reason and not reason.startswith("not timed"):
            hint = ""
            if BATCH_INDEPENDENT in strategy.needs and not probes.batch_independent:
                hint = ("; use strategy='auto' (or a strategy without that need, such as 'full_diag'), or pass "
                        "batch_independent=True if you know the outputs do not mix samples")
            raise ValueError(f"strategy {label!r} cannot be used for this f: it {reason}{hint}")
        return strategy, chunk

    def check_forced(self, sig: Signature, problem: Problem, strategy: Strategy, chunk: int | None,
                     info: FnInfo) -> None:
        """A strategy the caller named is used as asked, but never silently wrong: cross-checked once
        per signature against the reference (trust.py), with a warning if they disagree."""
        label = f"{sig.key}/{candidate_label(strategy.name, chunk)}"
        if label in self._trusted:
            return
        self._trusted.add(label)
        dtype = computation_dtype(*trust.computation_dtypes(info.modules(), problem.x))
        with preserved_buffers(info.modules()):
            reference, why = trust.cross_check(_detached(problem), strategy, chunk, dtype)
        if why:
            warnings.warn(f"autojac: strategy {candidate_label(strategy.name, chunk)!r}, named for {sig.op} of "
                          f"{sig.fn_name}, {why} on a slice of the batch; its results are likely wrong for this f "
                          f"(use strategy='auto' to be served {reference} or another that agrees with it)",
                          AutojacWarning, stacklevel=caller_stacklevel())

    def recheck(self, entry: Entry, problem: Problem) -> Tensor:
        """A check of what the key leaves out (trust.py) before serving the call: batch independence
        (scheduled, or on the first call of an entry made again), and the plan's agreement with the
        reference where what f reads changed. If f mixes samples now, or the plan disagrees, the
        plan is made again for every entry of its signature, and the call gets the new plan's answer."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self.recheck(entry, problem.replace(x=normal_tensor(problem.x), v=normal_tensor(problem.v)))
        served, seen = entry.served, entry.served.generation
        with served.lock:  # one check at a time; a call that waited here while the plan was made again takes it
            if served.generation != seen:
                entry.pending = entry.verify = False
            else:
                if served.calls >= served.next_check:
                    served.next_check = trust.next_check(served.calls)
                verify, entry.pending, entry.verify = entry.verify, False, False
                self._check_served(entry, problem, verify)
        return served.strategy(problem, served.chunk)

    def _check_served(self, entry: Entry, problem: Problem, verify: bool) -> None:
        served, sig = entry.served, entry.sig
        modules = entry.info.modules()
        with preserved_buffers(modules), calls.checking():
            why = quick_coupling(problem.f, problem.x, self._generator) if served.plan.batch_independent else ""
        tune = config.tuning_enabled(entry.tune) and not config.plan_required()
        if not why and verify:
            checked = self._cross_checked(sig, entry.info, served.plan, problem, tune)
            if checked is not served.plan:  # it disagreed with the reference: warned, and a plan made again
                served.rebind(sig, checked)
            return
        if not why:
            return
        if served.plan.key in self._made:  # probed here: f changed since (weights trained, a tensor swapped)
            log.info("%s of %s mixes samples now (%s), which its plan (%s) assumed it did not; making a new plan",
                     sig.op, sig.fn_name, why, served.plan.label)
        else:  # a stored plan whose claim of batch independence is wrong for this f
            warnings.warn(f"autojac: the stored plan for {sig.op} of {sig.fn_name} cannot be used (its strategy "
                          f"{served.plan.label} needs a batch-independent f, and {why}); making a new one",
                          AutojacWarning, stacklevel=caller_stacklevel())
        served.next_check = 0  # the other threads' calls wait on the lock for the new plan
        self.invalidate(sig)
        plan, _ = self.plan(sig, problem, tune=tune, again=True)
        served.rebind(sig, plan)

    def invalidate(self, sig: Signature) -> None:
        """Forget what was learnt about sig's f: its probes and its plans at every batch size (and
        for every operation); the plans served for them check f again on their next call."""
        probe_key = dataclasses.replace(sig, op="", create_graph=False, batch=0)

        def related(other: Signature) -> bool:
            return dataclasses.replace(other, op="", create_graph=False, batch=0) == probe_key

        self._probes = {k: v for k, v in self._probes.items() if not related(k)}
        self._fused_norms.clear()  # taken from the probes again, where they are kept
        for known in [s for s in self._hot if related(s)]:
            self._hot.pop(known, None)
            self._trusted.discard(known.key)
            self._families.pop(known.family, None)
        self._families.pop(sig.family, None)
        with self._guard:
            for known, served in self._served.items():
                if known != sig and related(known) and served.next_check < math.inf:
                    served.next_check = 0

    def forget(self) -> None:
        """Drop every memoized plan, probe and entry (the store is left alone)."""
        self._hot.clear()
        self._families.clear()
        self._probes.clear()
        self._fused_norms.clear()
        self._trusted.clear()
        self._made.clear()
        self._served.clear()
        self._entries = WeakTable()

    # -- making plans ---------------------------------------------------------------------------

    def _memoize(self, sig: Signature, plan: Plan) -> None:
        self._hot[sig] = plan
        if plan.tuned and plan.tuned_batch is None:
            self._families.setdefault(sig.family, {})[sig.batch] = plan

    def nearby(self, sig: Signature, problem: Problem) -> Plan | None:
        """A tuned plan of the same signature at the nearest batch size within BATCH_REUSE_FACTOR,
        made for this batch size without timing if its strategy fits in memory here; else None."""
        known = dict(self._families.get(sig.family, {}))
        nearest = _nearest(known, sig.batch)
        if nearest is None and isinstance(self.store, (cache.DiskStore, cache.EnvironmentStore)):
            for plan in self.store.family(sig.family):  # plans of this family not yet used here
                known.setdefault(plan.batch_size, plan)
            nearest = _nearest(known, sig.batch)
        if nearest is None:
            return None
        source = known[nearest]
        if _unsuitable(source, sig, problem):
            return None
        strategy = registry.get(source.strategy, sig.op)
        scale = sig.batch / source.batch_size
        sizes = Sizes(batch=sig.batch, n=math.prod(sig.in_shape), m=math.prod(source.out_shape),
                      itemsize=problem.x.element_size(), activations=int(source.activations * scale),
                      create_graph=sig.create_graph)
        budget = memory.budget_bytes(problem.x.device)
        estimate = strategy.memory(sizes, source.chunk)
        if budget is not None and estimate > budget:
            return None
        plan = source.model_copy(update=dict(
            key=sig.key, batch_size=sig.batch, tuned_batch=source.batch_size, tuning_seconds=0.0,
            memory={source.label: estimate}, family=sig.family,
            created=datetime_now()))
        self._memoize(sig, plan)
        for learnt in (self._trusted, self._made):  # what was learnt of the source holds for its reuse
            if source.key in learnt:
                learnt.add(sig.key)
        log.info("reusing the plan of %s of %s tuned at B=%d for B=%d: %s", sig.op, sig.fn_name,
                 source.batch_size, sig.batch, plan.label)
        return plan

    def _cross_checked(self, sig: Signature, info: FnInfo, plan: Plan, problem: Problem, tuning: bool) -> Plan:
        """Cross-check a plan once against an independent strategy (trust.py); if they disagree, the
        plan that serves the reference (or one tuned again without the failing strategy), with a
        warning; else the plan itself."""
        dtype = computation_dtype(*trust.computation_dtypes(info.modules(), problem.x))
        with preserved_buffers(info.modules()):
            reference, why = trust.cross_check(_detached(problem), registry.get(plan.strategy, plan.op), plan.chunk,
                                               dtype)
        self._trusted.add(sig.key)
        if not why:
            return plan
        warnings.warn(trust.disagreement_warning(plan.label, sig.op, sig.fn_name, reference, why),
                      AutojacWarning, stacklevel=caller_stacklevel())
        excluded = {**plan.excluded, plan.label: f"excluded: {why} (cross-check)"}
        self._hot.pop(sig, None)
        if tuning and not config.plan_required():
            plan, _ = self.plan(sig, problem, tune=True, exclude={plan.label: excluded[plan.label]})
            return plan
        plan = plan.model_copy(update=dict(strategy=reference, chunk=None, excluded=excluded,
                                           timings={}, spread={}, created=datetime_now()))
        self._memoize(sig, plan)
        self.store.put(plan)
        return plan

    def _lock_for(self, sig: Signature) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sig, threading.Lock())

    def _make(self, sig: Signature, problem: Problem, tune: bool, settings: TuneSettings,
              persist: bool = True, exclude: dict[str, str] | None = None) -> tuple[Plan, Tensor | None]:
        if tune:
            _warm_transforms()
        # a torch.compile'd f is probed and tuned uncompiled: compile time is no strategy's time
        problem = compiled.for_tuning(problem)
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
        sizes = Sizes.of(problem.x, probes.out_shape, probes.activations, create_graph=sig.create_graph)
        budget = memory.budget_bytes(problem.x.device)
        pool, excluded = candidates(sig.op, sizes, probes, create_graph=sig.create_graph, budget=budget,
                                    problem=problem)
        if exclude:
            pool = [c for c in pool if c.label not in exclude]
            excluded.update(exclude)
        if not pool:
            raise NoCandidateError(sig.op, excluded, _memory_hint(excluded, sig.batch))
        if tune:  # a tuning can take many seconds: say what it is before it starts
            log.info("tuning %s of %s [B=%d in=%s out=%s %s %s]: %d candidates (%d excluded), budget %g s",
                     sig.op, sig.fn_name, sig.batch, sig.in_shape, probes.out_shape, sig.dtype, sig.device,
                     len(pool), len(excluded), settings.budget)
        modules = describe(problem_f(problem)).modules()
        # Tuning runs candidates on a detached x, so that its backward passes never reach into the
        # caller's graph; the caller's call then runs the winner on the caller's x.
        trial = _detached(problem) if tune else problem
        backward = _BackwardPass() if tune and sig.create_graph else None
        # Tuning runs f many times and leaves its buffers as they were; then the caller's call
        # runs the winner once. Without tuning, the winner's one run is the caller's call: each
        # attempt starts from the buffers as they were, and the winner's update stays.
        buffers = BufferSnapshot(modules)

        def run(candidate: Candidate) -> Tensor:
            if not tune:
                buffers.restore()
            result = candidate.strategy(trial, candidate.chunk)
            if backward is not None:  # with create_graph the user pays for a backward pass too
                backward(result)
            return result

        dtype = computation_dtype(probes.out_dtype, *trust.computation_dtypes(modules, problem.x))
        references = {candidate_label(name, None) for name in trust.REFERENCES.get(sig.op, ())}
        kept = False
        try:
            outcome = choose(pool, run, clock=clock, settings=settings, tune=tune, started=started,
                             chunk_first_above=memory.chunk_first_above(problem.x.device),
                             dtype=dtype, order=trust.order(sig.op), references=references)
            kept = not tune
        except NoCandidateError as error:
            reasons = {**excluded, **error.reasons}
            raise NoCandidateError(sig.op, reasons, _memory_hint(reasons, sig.batch)) from None
        finally:
            if not kept:
                buffers.restore()
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
            tuning_seconds=time.perf_counter() - wall, activations=probes.activations, family=sig.family,
            call=sig.call,
        )
        self._memoize(sig, plan)
        self._made.add(sig.key)
        if outcome.verified:
            self._trusted.add(sig.key)  # the winner agreed with a reference during tuning
        if persist:
            self.store.put(plan)
        if tune:
            log.info("tuned %s of %s [B=%d in=%s out=%s] in %.2f s: %s won (%d timed, %d excluded)",
                     sig.op, sig.fn_name, sig.batch, sig.in_shape, plan.out_shape, plan.tuning_seconds,
                     plan.label, len(plan.timings), len(plan.excluded))
        else:
            log.info("chose %s for %s of %s by heuristic (tuning off)", plan.label, sig.op, sig.fn_name)
        return plan, outcome.result


def _nearest(batch_sizes: Collection[int], batch: int) -> int | None:
    """The batch size nearest to `batch` (by ratio) within BATCH_REUSE_FACTOR, or None."""
    near = [(abs(math.log(b / batch)), b) for b in batch_sizes
            if b > 0 and batch > 0 and abs(math.log(b / batch)) <= math.log(BATCH_REUSE_FACTOR)]
    return min(near)[1] if near else None


def problem_f(problem: Problem) -> BatchedFn:
    """The f the caller passed (before extra arguments were bound)."""
    return problem.base if problem.base is not None else problem.f


def _detached(problem: Problem) -> Problem:
    """The call on an x cut from the caller's graph (a leaf that requires grad where x did), so
    that backward passes run for autojac's own purposes cannot free or reach into that graph."""
    x = problem.x
    if not x.requires_grad:
        return problem
    return problem.replace(x=x.detach().requires_grad_(True))


def datetime_now() -> datetime:  # as Plan.created wants
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _unsuitable(plan: Plan, sig: Signature, problem: Problem | None) -> bool:
    """A stored plan whose strategy does not serve this call any more (it does not apply to f, a
    newer autojac removed it): skipped with a warning, and the call plans again."""
    reason = cache.unusable_reason(plan)
    if not reason and problem is not None:
        applies = registry.get(plan.strategy, plan.op).applies
        why = applies(problem) if applies is not None else ""
        reason = f"its strategy {plan.strategy} does not apply to this f: {why}" if why else ""
    if not reason:
        return False
    warnings.warn(f"autojac: the stored plan for {sig.op} of {sig.fn_name} cannot be used ({reason}); "
                  f"making a new one", AutojacWarning, stacklevel=caller_stacklevel())
    return True


def _describes(plan: Plan, sig: Signature) -> bool:
    """Whether a plan read from a store is for this very signature (a crafted file could put any
    plan under any key)."""
    return (plan.key, plan.op, plan.batch_size, plan.in_shape, plan.dtype, plan.device, plan.device_name,
            plan.create_graph, plan.fn_name, plan.fingerprint, plan.torch_version) == (
        sig.key, sig.op, sig.batch, sig.in_shape, sig.dtype, sig.device, sig.device_name,
        sig.create_graph, sig.fn_name, sig.fingerprint, sig.torch_version)


def missing_plan_message(sig: Signature, store: PlanStore, warm_call: str | None = None) -> str:
    """Why a call under AUTOJAC_REQUIRE_PLAN=1 has no plan, and how to make it: `warm_call` is the
    autojac.warm call that makes it, where the call has extras (args, dims, a set of derivatives)
    that the plain advice and the CLI do not carry."""
    shape = ",".join(str(size) for size in (sig.batch, *sig.in_shape))
    where = []
    path = getattr(store, "path", None)
    if path is not None:
        where.append(str(path))
        shipped = getattr(store, "shipped", ())
        if shipped:
            where.append(f"AUTOJAC_PLANS={os.pathsep.join(map(str, shipped))}")
    graph = ", create_graph=True" if sig.create_graph else ""
    # the modules' training flags are part of the key: the plan must be made in the same mode
    flag = " --eval" if sig.training and not any(sig.training) else ""
    mixed = (" with its modules in the same training modes (some are in eval mode)"
             if any(sig.training) and not all(sig.training) else "")
    if warm_call is None:
        advice = (f"autojac.warm(f, x, ops=({sig.op!r},){graph}) with x of shape ({shape}), or "
                  f"`autojac warm MODULE:ATTR --input-shape {shape} --dtype {sig.dtype} --device {sig.device} "
                  f"--op {sig.op}{' --create-graph' if graph else ''}{flag}`{mixed}")
    else:
        advice = f"{warm_call}{mixed}"
    return (
        f"no stored plan for {sig.op} of {sig.fn_name} [B={sig.batch} in={sig.in_shape} {sig.dtype} "
        f"{sig.device} ({sig.device_name}){graph}], key {sig.key}, and AUTOJAC_REQUIRE_PLAN=1 forbids making "
        f"one (looked in {' and '.join(where) or 'memory'}). Pre-warm it where plans are made: {advice}; then "
        f"ship the plans (autojac export, and AUTOJAC_PLANS or autojac import here), or unset AUTOJAC_REQUIRE_PLAN"
    )


class _BackwardPass:
    """A backward pass of a scalar loss through a result, into the leaves its graph reaches (found
    once, on the first untimed call), without touching anyone's .grad. The graph is kept: parts of
    it may be the caller's (parameters adapted inside a graph, as in MAML), which a backward pass
    of autojac's own must not free."""

    def __init__(self) -> None:
        self.leaves: list[Tensor] | None = None

    def __call__(self, result: Tensor | tuple[Tensor, ...]) -> None:
        results = [r for r in (result if isinstance(result, tuple) else (result,)) if r.requires_grad]
        if not results:
            return
        loss = cast(Tensor, sum(r.sum() for r in results))
        if self.leaves is None:
            self.leaves = _graph_leaves(loss)
        if self.leaves:
            torch.autograd.grad(loss, self.leaves, allow_unused=True, retain_graph=True)


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
        _, pullback = torch.func.vjp(torch.sin, x)  # type: ignore[misc]  # annotated with has_aux's triple too
        torch.func.vmap(pullback)(torch.ones(1, 2, 1))
        torch.func.vmap(lambda t: torch.func.jvp(torch.sin, (x,), (t,)))(torch.ones(1, 2, 1))


_default: Planner | None = None
_default_guard = threading.Lock()


def default_planner() -> Planner:
    """The process-wide planner that the public functions use."""
    global _default
    if _default is None:
        with _default_guard:
            if _default is None:
                _default = Planner(cache.default_store())
    return _default


def set_default_planner(planner: Planner) -> Planner:
    """Replace the process-wide planner (tests, other stores); returns the old one."""
    global _default
    with _default_guard:
        old, _default = _default, planner
    return old or Planner(cache.default_store())
