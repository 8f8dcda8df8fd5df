"""Measuring one case: every fixed strategy, the baselines and autojac's public call, side by side.

1. Skip the case if its cheapest call would make no sense here (result over the memory budget,
   or an estimated time over `estimate_cap`).
2. autojac's first public call, with a fresh in-memory planner: the tuning time; its result is
   the reference every contender is checked against.
3. The fixed strategies are the planner's own candidates for this f (`planner.candidates`:
   validity from the probes, the memory budget); with `settings.coupled_only`, the strategies
   the planner keeps for batch-coupled f (`full_diag`) too, since a user may still pick them,
   in their chunked forms (the time cap stops those between chunks).
4. Each contender's first call runs under `call_cap` (stopped and recorded as a timeout past it;
   smaller chunks of a strategy that timed out, or whose chunked run was over `repeat_cap`, are
   skipped); one slower than `repeat_cap` keeps that single time. The rest are timed by
   `autojac.timing.compare`, interleaved with autojac's public call, after a warm-up; medians.
5. The oracle (fastest fixed strategy that agrees), regret, speed-ups over the baselines, FLOPs
   of autojac's choice against the matmul ceiling, its dispatch overhead, and peak memory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import autojac
from autojac import memory
from autojac.models import OPS, Plan, parse_label
from autojac.numerics import agree
from autojac.planner import Planner, candidates, set_default_planner
from autojac.probes import Probes, run_probes
from autojac.problem import Problem, Sizes
from autojac.store import MemoryStore
from autojac.strategies import registry
from autojac.timing import Clock, clock_for, compare, timed
from autojac.tuner import describe_failure, release_memory

from . import baselines
from .deadline import Overtime, deadline
from .machine import count_flops
from .peak import peak_rss
from .schema import TIMED, CaseResult, Dispatch, Kind, Machine, Measurement, Settings
from .workloads import Case

DISPATCH_BELOW = 2e-3  # seconds: the dispatch overhead is measured on calls faster than this
UNCHUNKED_EXTRA = ("not timed on a batch-independent f: all of its B times the work in one vectorized call, which "
                   "the time cap cannot stop until it returns (minutes at B=512); its chunked forms stand for it")
_SLOW = {"timeout": "was stopped at the time cap", "single": "took over the repeat cap"}
_EFFICIENCY = 0.1  # share of the matmul ceiling assumed when estimating a case's time


def available_ops() -> tuple[list[str], list[str]]:
    """Operations with registered strategies and a public call, and a note for each one without."""
    ops, notes = [], []
    for op in OPS:
        has_strategies, has_call = bool(registry.for_op(op)), callable(getattr(autojac, op, None))
        if has_strategies and has_call:
            ops.append(op)
        elif not has_strategies:
            notes.append(f"{op}: skipped, no strategy is registered for it")
        else:
            notes.append(f"{op}: skipped, strategies are registered but there is no public autojac.{op}")
    return ops, notes


def public_call(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None) -> Callable[[], Tensor]:
    """autojac.<op>(f, x) (hvp: (f, x, v)), as a user calls it."""
    fn = getattr(autojac, op)
    return (lambda: fn(f, x, v)) if op == "hvp" else (lambda: fn(f, x))


@dataclass
class Contender:
    label: str
    kind: Kind
    run: Callable[[], Tensor] | None
    memory_estimate: int | None = None
    role: str | None = None  # a baseline's role: tutorial or full
    reason: str = ""
    same_as: str | None = None  # a fixed strategy's label that computes exactly this


def fixed_contenders(op: str, problem: Problem, probes: Probes, settings: Settings,
                     chosen: str | None) -> tuple[list[Contender], list[Measurement]]:
    """The fixed strategies to time (each chunk option, or unchunked ones plus `chosen`; with
    `settings.coupled_only` also those autojac keeps for batch-coupled f), and the excluded
    ones with the planner's reasons."""
    x = problem.x
    sizes = Sizes.of(x, probes.out_shape, probes.activations)
    budget = memory.budget_bytes(x.device)
    valid, excluded = candidates(op, sizes, probes, create_graph=False, budget=budget, problem=problem)
    if probes.batch_independent and settings.coupled_only:
        # The planner offers coupled-only strategies (full_diag) to batch-coupled f alone; a
        # user can still choose them, so they are timed too, under the same memory budget.
        as_coupled, why_not = candidates(op, sizes, dataclasses.replace(probes, batch_independent=False),
                                         create_graph=False, budget=budget, problem=problem)
        for candidate in as_coupled:
            if not candidate.strategy.coupled_only:
                continue
            if candidate.chunk is None:  # one vectorized call of B times the work: minutes, unstoppable
                excluded[candidate.label] = UNCHUNKED_EXTRA
                continue
            valid.append(candidate)
            excluded.pop(candidate.label, None)
        for label, why in why_not.items():
            if registry.get(parse_label(label)[0]).coupled_only:
                excluded[label] = why
    if settings.chunks == "unchunked":
        whole = {c.strategy.name for c in valid if c.chunk is None}
        first_chunk: dict[str, str] = {}
        for c in valid:
            if c.strategy.name not in whole:
                first_chunk.setdefault(c.strategy.name, c.label)
        keep = {c.label for c in valid if c.chunk is None} | set(first_chunk.values()) | {chosen}
        valid = [c for c in valid if c.label in keep]
    contenders = [Contender(c.label, "fixed", _bind(c.strategy, problem, c.chunk), c.memory) for c in valid]
    left_out = [Measurement(label=label, kind="fixed", status="excluded", reason=why) for label, why in excluded.items()]
    return contenders, left_out


def _bind(strategy: registry.Strategy, problem: Problem, chunk: int | None) -> Callable[[], Tensor]:
    return lambda: strategy(problem, chunk)


def baseline_contenders(op: str, f, x: Tensor, v: Tensor | None, probes: Probes) -> list[Contender]:
    return [Contender(b.name, "baseline", b.run, role=b.role, reason=b.reason, same_as=b.same_as)
            for b in baselines.for_op(op, f, x, v, probes)]


def contender_for_peak(case: Case, label: str, kind: str) -> Callable[[], Tensor]:
    """Rebuild one contender of a case (in the peak-memory subprocess)."""
    f, x, v = case.make("cpu")
    probes = run_probes(f, x)
    if kind == "fixed":
        name, chunk = parse_label(label)
        return _bind(registry.get(name, case.op), Problem(case.op, f, x, v), chunk)
    for contender in baseline_contenders(case.op, f, x, v, probes):
        if contender.label == label and contender.run is not None:
            return contender.run
    raise ValueError(f"no runnable baseline {label!r} for {case.op} of {case.workload.name}")


def skip_reason(case: Case, f, x: Tensor, out_numel: int, ceiling: float, cap: float) -> str:
    """Why the case makes no sense on this machine, or "": the result alone over the memory
    budget, or the cheapest strategy's estimated time over `cap` seconds."""
    n, m = case.workload.n, out_numel
    tail = {"jacobian": n, "hvp": n, "hessian_diag": n, "hessian": n * n, "laplacian": 1}.get(case.op, n * n)
    result = 3 * case.batch * m * tail * x.element_size()  # the result, a basis chunk, a gradient
    budget = memory.budget_bytes(x.device)
    if budget is not None and result > budget:
        return (f"estimated memory: the result and its working copies need about {memory.format_bytes(result)}, "
                f"over the budget of {memory.format_bytes(budget)}")
    with torch.no_grad():
        forward = max(count_flops(lambda: f(x)), 10 * x.numel())  # elementwise-only f: ~10 FLOPs per input
    # Forward passes' worth of work of the cheapest way: min(n, m) products for a Jacobian; one
    # HVP; n HVPs, or n^2 forward-over-forward products serving every output, for a Hessian;
    # a nested forward product per input for its diagonal.
    passes = {"jacobian": 2 * min(n, m) + 1, "hvp": 5, "hessian": 5 * n * min(n, m),
              "hessian_diag": 6 * n, "laplacian": 6 * n}.get(case.op, 5 * n * min(n, m))
    seconds = passes * forward / (_EFFICIENCY * ceiling)
    if seconds > cap:
        return f"estimated time: about {seconds:.3g} s per call for the cheapest strategy (cap {cap:g} s)"
    return ""


def _describe_failure(error: BaseException) -> tuple[str, str]:
    """(status, reason) of a contender that raised."""
    reason = describe_failure(error)
    return ("oom" if reason.startswith("out of memory") else "error"), reason


class _CaseRun:
    """The contenders of one case and what their first calls found."""

    def __init__(self, case: Case, settings: Settings, clock: Clock, reference: Tensor):
        self.case, self.settings, self.clock, self.reference = case, settings, clock, reference
        self.results: dict[str, Measurement] = {}
        self.pool: dict[str, Callable[[], Tensor]] = {}  # contenders to time with repeats

    def first_call(self, c: Contender) -> None:
        """Run c once under the call cap, check its result; queue it for repeats if fast enough."""
        device = self.reference.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        status, reason, seconds, agrees = "ok", c.reason, None, None
        try:
            with deadline(self.settings.call_cap):
                result, seconds = timed(self.clock, c.run)
        except Overtime as stop:
            status, reason = "timeout", str(stop)
        except Exception as error:  # a failing contender is data: recorded with its reason
            status, reason = _describe_failure(error)
        else:
            agrees, reason = self._check(result)
            del result
        peak = None
        if device.type == "cuda" and status == "ok":
            peak = torch.cuda.max_memory_allocated(device) - before
        if status != "ok":
            release_memory()
        entry = Measurement(label=c.label, kind=c.kind, status=status, reason=reason, agrees=agrees,
                            memory_estimate=c.memory_estimate, peak_memory=peak)
        if status == "ok" and seconds is not None and seconds > self.settings.repeat_cap:
            entry = entry.model_copy(update=dict(
                status="single", median=seconds, p20=seconds, p80=seconds, repeats=1,
                reason=_join(reason, f"timed once: its first call took over {self.settings.repeat_cap:g} s")))
        elif status == "ok":
            self.pool[c.label] = c.run
        self.results[c.label] = entry

    def try_fixed(self, fixed: list[Contender]) -> None:
        """First calls of the fixed strategies, in the planner's order, each strategy's chunks in
        decreasing order. After a timeout, or a chunked run over the repeat cap, smaller chunks
        are skipped (they do more passes); an unchunked run that was merely slow may be
        memory-bound, so its chunks are still tried."""
        too_slow: dict[str, str] = {}  # strategy -> the label that rules out its smaller chunks
        for c in fixed:
            name, chunk = parse_label(c.label)
            if name in too_slow:
                why = _SLOW[self.results[too_slow[name]].status]
                self.results[c.label] = Measurement(
                    label=c.label, kind="fixed", status="skipped", memory_estimate=c.memory_estimate,
                    reason=f"{too_slow[name]} {why}, and smaller chunks do more passes")
                continue
            self.first_call(c)
            status = self.results[c.label].status
            if status == "timeout" or (status == "single" and chunk is not None):
                too_slow[name] = c.label

    def try_baselines(self, others: list[Contender]) -> list[Contender]:
        """First calls of the baselines; returns those that repeat a fixed strategy that ran."""
        ran = {label for label, m in self.results.items() if m.status not in ("excluded", "skipped")}
        twins = [c for c in others if c.same_as in ran]
        for c in others:
            if c.run is None:
                self.results[c.label] = Measurement(label=c.label, kind="baseline", status="excluded",
                                                    reason=c.reason)
            elif c not in twins:
                self.first_call(c)
        return twins

    def copy_twins(self, twins: list[Contender]) -> None:
        """A baseline that is the same computation as a fixed strategy is measured once for both."""
        for c in twins:
            twin = self.results[c.same_as]
            note = f"the same computation as the fixed strategy {c.same_as}, measured once for both"
            self.results[c.label] = twin.model_copy(update=dict(label=c.label, kind="baseline",
                                                                reason=_join(twin.reason, note)))

    def _check(self, result: object) -> tuple[bool, str]:
        if not isinstance(result, Tensor) or result.shape != self.reference.shape:
            shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
            return False, f"result has shape {shape}, autojac's {tuple(self.reference.shape)}"
        same, diff, allowed = agree(result, self.reference)
        return same, "" if same else f"result differs from autojac's by {diff:.3g} (allowed {allowed:.3g})"

    def time_pool(self, autojac_call: Callable[[], Tensor]) -> None:
        """Interleaved timed rounds of every queued contender and autojac's public call."""
        fns = {**self.pool, "autojac": autojac_call}
        samples = compare(fns, self.clock, min_time=self.settings.min_time, min_repeats=self.settings.min_repeats)
        for label, s in samples.items():
            t = s.summary()
            timing = dict(median=t.median, p20=t.p20, p80=t.p80, repeats=t.repeats)
            if label == "autojac":
                self.results[label] = Measurement(label="autojac", kind="autojac", status="ok", agrees=True, **timing)
            else:
                self.results[label] = self.results[label].model_copy(update=timing)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def measure_case(case: Case, settings: Settings, machine: Machine, device: torch.device) -> CaseResult:
    """Measure one case; see the module docstring."""
    started = time.perf_counter()
    f, x, v = case.make(device)
    head = dict(suite=case.suite, workload=case.workload.name, title=case.workload.title, op=case.op,
                batch=case.batch, in_shape=list(x.shape[1:]), dtype=case.dtype)
    with torch.no_grad():
        out_shape = list(f(x).shape[1:])
    head["out_shape"] = out_shape
    reason = skip_reason(case, f, x, math.prod(out_shape), machine.matmul_flops[case.dtype], settings.estimate_cap)
    if reason:
        return CaseResult(**head, status="skipped", reason=reason, seconds=time.perf_counter() - started)
    old = set_default_planner(Planner(store=MemoryStore()))
    try:
        result = _measure(case, settings, machine, f, x, v, head)
    finally:
        set_default_planner(old)
        release_memory()
    return result.model_copy(update={"seconds": time.perf_counter() - started})


def _measure(case: Case, settings: Settings, machine: Machine, f, x: Tensor, v: Tensor | None,
             head: dict) -> CaseResult:
    clock = clock_for(x.device)
    call = public_call(case.op, f, x, v)
    try:
        with deadline(settings.tune_cap):
            reference, tuning = timed(clock, call)
    except Overtime as stop:
        return CaseResult(**head, status="failed", reason=f"autojac's first (tuning) call {stop}")
    except Exception as error:  # reported in the results, not raised: the run goes on
        return CaseResult(**head, status="failed", reason=f"autojac raised {_describe_failure(error)[1]}")
    plan: Plan = autojac.explain(f, x, op=case.op, v=v)
    probes = run_probes(f, x)
    problem = Problem(case.op, f, x, v)
    fixed, left_out = fixed_contenders(case.op, problem, probes, settings, plan.label)
    others = baseline_contenders(case.op, f, x, v, probes)
    run = _CaseRun(case, settings, clock, reference)
    run.try_fixed(fixed)
    twins = run.try_baselines(others)
    run.time_pool(call)
    run.copy_twins(twins)
    if _wants_peak(settings, case, x.device):
        fastest = min((m for m in run.results.values() if m.kind == "fixed" and m.status in TIMED and m.agrees),
                      key=lambda m: m.median, default=None)
        key = {plan.label, *(c.label for c in others), *([fastest.label] if fastest else [])}
        _peak_memory(run.results, case, settings, key)
    chosen = run.results.get(plan.label)
    if chosen is not None:  # autojac runs its choice: the same peak (tuning aside)
        run.results["autojac"] = run.results["autojac"].model_copy(update={"peak_memory": chosen.peak_memory})
    measurements = list(run.results.values()) + left_out
    figures = _figures(run.results, fixed, others, settings, plan, machine, case)
    dispatch = _dispatch(case.op, f, x, v, plan, run.results["autojac"].median or 0.0, clock, settings)
    return CaseResult(
        **head, status="ok", batch_independent=probes.batch_independent, vmap_ok=probes.vmap_ok,
        measurements=measurements, chosen=plan.label, tuning_seconds=tuning,
        autojac=run.results["autojac"].median, dispatch=dispatch, **figures,
    )


def _figures(results: dict[str, Measurement], fixed: list[Contender], others: list[Contender],
             settings: Settings, plan: Plan, machine: Machine, case: Case) -> dict:
    """Oracle, regret, speed-ups and FLOP/s of a measured case."""
    ours = results["autojac"].median
    figures: dict = {}
    eligible = [results[c.label] for c in fixed if results[c.label].status in TIMED and results[c.label].agrees]
    if eligible and ours:
        best = min(eligible, key=lambda m: m.median)
        figures.update(oracle=best.label, oracle_time=best.median, regret=ours / best.median)
    for c in others:
        m = results[c.label]
        key = "tutorial" if c.role == "tutorial" else "full"
        if figures.get(key) is not None and figures.get(f"speedup_{key}") is not None:
            continue  # the first measured baseline of each role counts
        figures[key] = c.label
        if ours and m.status in TIMED:
            figures[f"speedup_{key}"] = m.median / ours
        elif ours and m.status == "timeout":
            figures[f"speedup_{key}"] = settings.call_cap / ours
            figures[f"speedup_{key}_at_least"] = True
    winner = results.get(plan.label)
    if winner is not None and winner.status in TIMED:
        contender = next(c for c in fixed if c.label == plan.label)
        try:
            flops = count_flops(contender.run)
        except Exception:  # some ops cannot run under a dispatch mode: no FLOP figure then
            flops = None
        if flops:
            achieved = flops / winner.median
            figures.update(flops=flops, achieved_flops=achieved,
                           ceiling_fraction=achieved / machine.matmul_flops[case.dtype])
    return figures


def _dispatch(op: str, f, x: Tensor, v: Tensor | None, plan: Plan, ours: float, clock: Clock,
              settings: Settings) -> Dispatch | None:
    """A tuned public call against the winning strategy called directly, on fast calls only."""
    if not ours or ours > DISPATCH_BELOW:
        return None
    strategy = registry.get(plan.strategy, op)
    fns = {"autojac": public_call(op, f, x, v), "direct": lambda: strategy(Problem(op, f, x, v), plan.chunk)}
    samples = compare(fns, clock, min_time=settings.dispatch_time, max_repeats=100_000)
    ours, direct = samples["autojac"].median, samples["direct"].median
    return Dispatch(autojac=ours, direct=direct, overhead=ours - direct,
                    repeats=min(len(s.seconds) for s in samples.values()))


def _wants_peak(settings: Settings, case: Case, device: torch.device) -> bool:
    """CPU peak memory needs a subprocess per contender: only where the settings ask for it."""
    if device.type != "cpu":
        return False  # CUDA: measured in-process with every first call
    return settings.memory == "all" or (settings.memory == "key" and case.batch >= 512)


def _peak_memory(results: dict[str, Measurement], case: Case, settings: Settings, key: set[str]) -> None:
    """Peak RSS of every timed contender ("all"), or of those in `key` ("key")."""
    for label, m in list(results.items()):
        if m.kind == "autojac" or m.status not in TIMED or (settings.memory == "key" and label not in key):
            continue
        spec = dict(workload=case.workload.name, op=case.op, batch=case.batch, dtype=case.dtype, label=label,
                    kind=m.kind, threads=torch.get_num_threads())
        peak, note = peak_rss(spec, timeout=60 + 3 * settings.call_cap)
        results[label] = m.model_copy(update={"peak_memory": peak, "reason": _join(m.reason, note)})
