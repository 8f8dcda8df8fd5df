"""The planner: which strategies apply, in what order to try them, and which one wins.

Plans are memoized per signature in memory (the hot path is one dict lookup) and kept in
a `PlanStore` (by default the disk cache of cache.py), which is asked only on a miss. On a
miss the planner probes f once, lists the candidates that are valid for it and fit in
memory, and then either tunes (times them, cross-checks their results) or, with tuning off,
takes the first candidate in the heuristic order that runs. With AUTOJAC_REQUIRE_PLAN=1 a
miss is an error instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import cache, config, distributed, memory
from ._version import __version__
from .errors import AutojacWarning, NoCandidateError, NonDeterministicError, PlanRequiredError
from .models import Plan, candidate_label, parse_label
from .probes import Probes, run_probes
from .problem import BatchedFn, Problem, Sizes
from .signature import Signature, describe, identity_state, weak_slot
from .store import MemoryStore, PlanStore
from .strategies import registry
from .strategies.registry import BATCH_INDEPENDENT, VMAP, Strategy
from .timing import Clock, TuneSettings, clock_for
from .tuner import Candidate, caller_stacklevel, choose

log = logging.getLogger("autojac")


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


def _memory_hint(reasons: dict[str, str], batch: int) -> str:
    if not any("memory" in why for why in reasons.values()):
        return ""
    piece = max(1, batch // 4)
    return (f"Candidates that suit f need more memory than is free. Try a smaller batch: split x into "
            f"pieces (torch.split(x, {piece})) and concatenate the results with torch.cat")


class BufferSnapshot:
    """Every buffer of some modules (BatchNorm's running statistics, say) as it was when taken."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.saved = [(b, b.detach().clone()) for m in modules for b in m.buffers(recurse=False)]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, copy in self.saved:
                buffer.copy_(copy)


@contextlib.contextmanager
def preserved_buffers(modules: Sequence[nn.Module]) -> Iterator[BufferSnapshot]:
    """Restore every buffer after the block has run f (probes, tuning)."""
    snapshot = BufferSnapshot(modules)
    try:
        yield snapshot
    finally:
        snapshot.restore()


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
        # The hot path's shortcut to tuned plans, by f (weakly) and by what the call shows at a
        # glance; an entry serves only while f's identity state is as it was (see `shortcut`).
        self._shortcuts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._probes: dict[Signature, Probes] = {}
        self._locks: dict[Signature, threading.Lock] = {}
        self._guard = threading.Lock()

    def cached(self, sig: Signature) -> Plan | None:
        """The plan for sig from memory, else from the store; None on a miss."""
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
            if plan is not None:
                self._hot[sig] = plan
                distributed.publish(plan)
        return plan

    def shortcut(self, f: BatchedFn, glance: tuple) -> tuple[Plan, Strategy] | None:
        """The tuned plan remembered for f and this `glance` (operation, x's shape, dtype and
        device, options) and its strategy, if nothing f reads was rebound since: the hot path
        without building the signature. None on a miss: the caller takes `cached`/`plan`."""
        slot, name = weak_slot(f, self._shortcuts, make=False)
        found = slot.get((name, glance)) if slot is not None else None
        if found is None or found[0] != identity_state(f):
            return None
        if distributed.group_started():  # as in `cached`: a plan made before the group must reach it
            distributed.publish(found[1])
        return found[1], found[2]

    def remember(self, f: BatchedFn, glance: tuple, plan: Plan) -> None:
        """Let `shortcut` serve a tuned plan for f and `glance` from now on."""
        if plan.tuned:
            slot, name = weak_slot(f, self._shortcuts, make=True)
            if slot is not None:
                slot[(name, glance)] = (identity_state(f), plan, registry.get(plan.strategy, plan.op))

    def forget(self) -> None:
        """Drop every memoized plan and probe (the store is left alone)."""
        self._hot.clear()
        self._probes.clear()
        self._shortcuts = weakref.WeakKeyDictionary()

    def plan(self, sig: Signature, problem: Problem, *, tune: bool,
             settings: TuneSettings | None = None) -> tuple[Plan, Tensor | None]:
        """Make (or wait for) the plan for sig; also the result when the planning computed it."""
        with self._lock_for(sig):
            plan = self.cached(sig)
            follower = distributed.is_follower()
            required = config.plan_required()
            if plan is not None and (plan.tuned or not tune or follower or required):
                return plan, None
            if required:
                raise PlanRequiredError(_missing_plan_message(sig, self.store))
            if follower:  # rank 0 decides; only when it cannot be heard from does this rank choose
                plan, why = distributed.fetch(sig.key, sig.op)
                if plan is not None:
                    self._hot[sig] = plan
                    return plan, None
                warnings.warn(f"autojac: {why}; using the heuristic choice for {sig.op} of {sig.fn_name}",
                              AutojacWarning, stacklevel=caller_stacklevel())
                return self._make(sig, problem, False, settings or TuneSettings.from_env(), persist=False)
            plan, result = self._make(sig, problem, tune, settings or TuneSettings.from_env())
            distributed.publish(plan)
            return plan, result

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

    def _make(self, sig: Signature, problem: Problem, tune: bool, settings: TuneSettings,
              persist: bool = True) -> tuple[Plan, Tensor | None]:
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
        sizes = Sizes.of(problem.x, probes.out_shape, probes.activations, create_graph=sig.create_graph)
        budget = memory.budget_bytes(problem.x.device)
        pool, excluded = candidates(sig.op, sizes, probes, create_graph=sig.create_graph, budget=budget,
                                    problem=problem)
        if not pool:
            raise NoCandidateError(sig.op, excluded, _memory_hint(excluded, sig.batch))
        backward = _BackwardPass() if tune and sig.create_graph else None
        # Tuning runs f many times and leaves its buffers as they were; then the caller's call
        # runs the winner once. Without tuning, the winner's one run is the caller's call: each
        # attempt starts from the buffers as they were, and the winner's update stays.
        buffers = BufferSnapshot(describe(problem.f).modules())

        def run(candidate: Candidate) -> Tensor:
            if not tune:
                buffers.restore()
            result = candidate.strategy(problem, candidate.chunk)
            if backward is not None:  # with create_graph the user pays for a backward pass too
                backward(result)
            return result

        kept = False
        try:
            outcome = choose(pool, run, clock=clock, settings=settings, tune=tune, started=started,
                             chunk_first_above=memory.chunk_first_above(problem.x.device))
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
            tuning_seconds=time.perf_counter() - wall,
        )
        self._hot[sig] = plan
        if persist:
            self.store.put(plan)
        if tune:
            log.info("tuned %s of %s [B=%d in=%s out=%s] in %.2f s: %s won (%d timed, %d excluded)",
                     sig.op, sig.fn_name, sig.batch, sig.in_shape, plan.out_shape, plan.tuning_seconds,
                     plan.label, len(plan.timings), len(plan.excluded))
        else:
            log.info("chose %s for %s of %s by heuristic (tuning off)", plan.label, sig.op, sig.fn_name)
        return plan, outcome.result


def _describes(plan: Plan, sig: Signature) -> bool:
    """Whether a plan read from a store is for this very signature (a crafted file could put any
    plan under any key)."""
    return (plan.key, plan.op, plan.batch_size, plan.in_shape, plan.dtype, plan.device, plan.device_name,
            plan.create_graph, plan.fn_name, plan.fingerprint, plan.torch_version) == (
        sig.key, sig.op, sig.batch, sig.in_shape, sig.dtype, sig.device, sig.device_name,
        sig.create_graph, sig.fn_name, sig.fingerprint, sig.torch_version)


def _missing_plan_message(sig: Signature, store: PlanStore) -> str:
    shape = ",".join(str(size) for size in (sig.batch, *sig.in_shape))
    where = []
    if isinstance(store, cache.DiskStore):
        where.append(str(store.path))
        if store.shipped:
            where.append(f"AUTOJAC_PLANS={os.pathsep.join(map(str, store.shipped))}")
    graph = ", create_graph=True" if sig.create_graph else ""
    # the modules' training flags are part of the key: the plan must be made in the same mode
    flag = " --eval" if sig.training and not any(sig.training) else ""
    mixed = (" with its modules in the same training modes (some are in eval mode)"
             if any(sig.training) and not all(sig.training) else "")
    return (
        f"no stored plan for {sig.op} of {sig.fn_name} [B={sig.batch} in={sig.in_shape} {sig.dtype} "
        f"{sig.device} ({sig.device_name}){graph}], key {sig.key}, and AUTOJAC_REQUIRE_PLAN=1 forbids making "
        f"one (looked in {' and '.join(where) or 'memory'}). Pre-warm it where plans are made: "
        f"autojac.warm(f, x, ops=({sig.op!r},){graph}) with x of shape ({shape}), or "
        f"`autojac warm MODULE:ATTR --input-shape {shape} --dtype {sig.dtype} --device {sig.device} "
        f"--op {sig.op}{' --create-graph' if graph else ''}{flag}`{mixed}; then ship the plans (autojac export, and "
        f"AUTOJAC_PLANS or autojac import here), or unset AUTOJAC_REQUIRE_PLAN"
    )


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
