"""The benchmark of leanness (issue 12): is autojac as fast as the code a careful user writes by hand?

    python -m benchmarks.leanness [--out DIR] [--quick] [--only TEXT ...] [--sections 1,2,...]

Six sections, each measured side by side in one process (`autojac.timing.compare`: interleaved
rounds in a new order each time, after a warm-up; medians, and over several such comparisons the
median of their medians), with a fresh in-memory planner per measurement:

1. Twins. Every registered strategy, called directly (`strategy(Problem(...), chunk)`, unchunked
   and, in the full mode, at every chunk the registry offers), against its hand-written twin
   (benchmarks/twins.py: the same method in plain torch), whose result must equal the strategy's.
   Target: within 1.05x or 5 us. A strategy without a twin is listed as "no twin".
2. Oracles. autojac's tuned public call against the fastest twin of any strategy on that shape
   (the lean oracle; targets 1.10 geomean, 1.25 worst), and, on docs/design.md's 27-shape grid, against
   the fastest of its own candidate strategies called directly (targets 1.05 geomean, 1.3 worst).
3. Hot path. A tuned public call minus the chosen strategy called directly, on small models
   (target <= 5 us): many interleaved rounds, the median of the rounds' differences.
4. First call, in tuned calls: in a fresh process (a subprocess: torch.func's one-time start-up
   counts) and as a second problem in a warm process. Target: max(100 ms, 50 tuned calls) for
   problems whose tuned call takes under 2 ms.
5. A new batch size after tuning at B, within 2x and outside: the first call's cost, in tuned calls.
6. A new closure constant: an ODE right-hand side `lambda z: f(t, z)`, `functools.partial(f, t)`
   (and, in the full mode, `lambda z, t=t: f(t, z)`) for 5 values of t; a module whose training
   loop appends detached losses to a list attribute. Does a call re-tune, and at what cost.

Writes DIR/leanness-DEVICE-DATE-MODE.json (machine, versions, commit, load average, settings, every
figure) and the same stem .md. DIR defaults to a folder in the system's temporary directory,
never the source tree. AUTOJAC_TUNE_BUDGET is left as the environment sets it (autojac's default
when unset) unless --tune-budget is given. Everything autojac-specific is in benchmarks/lean_api.py.

Reproduce a comparison of two versions on one quiet machine: run it with each version's source
first on PYTHONPATH (e.g. a worktree of the old commit: `PYTHONPATH=/path/to/old/src:. python -m
benchmarks.leanness`); the JSON records which source and commit it measured. On a machine shared
with other work, `--threads 1` gives steadier figures (a second torch thread waiting for a busy
core stalls small calls for milliseconds).
"""

from __future__ import annotations

import dataclasses

import argparse
import functools
import json
import math
import operator
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import autojac

from . import lean_api as api
from . import lean_report, twins
from .machine import busy_note, load_average
from .workloads import DESIGN_GRID, mlp

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(tempfile.gettempdir()) / "autojac-benchmarks" / "leanness"
SCHEMA = "autojac-leanness/1"
SECTIONS = (1, 2, 3, 4, 5, 6)

# Targets of issue 12.
TWIN_RATIO, TWIN_SLACK = 1.05, 5e-6  # each strategy within 1.05x of its twin, or 5 us
LEAN_GEOMEAN, LEAN_WORST = 1.10, 1.25
OWN_GEOMEAN, OWN_WORST = 1.05, 1.3
DISPATCH_TARGET = 5e-6
FIRST_CALL_FLOOR, FIRST_CALL_CALLS, FIRST_CALL_BELOW = 0.1, 50, 2e-3
NEW_BATCH_CALLS = 5


@dataclass(frozen=True)
class Settings:
    """How the run measures; every field is written to the JSON."""

    mode: str
    min_time: float  # seconds of timed calls per contender in one side-by-side measurement (over all rounds)
    rounds: int  # separate interleaved comparisons per measurement: the median of their medians
    min_repeats: int  # timed calls per contender and round at least
    call_cap: float  # a contender whose first call takes longer is timed by one more call only
    chunks: str  # "all": every chunk the registry offers; "first": its first option (usually unchunked)
    coupled_rows: int  # strategies kept for batch-coupled f (B times the work) only where B*m <= this
    oracle_twins: int  # the fastest twins of section 1 timed against autojac in section 2
    dispatch_rounds: int
    dispatch_time: float  # seconds per contender per round of section 3
    fresh_processes: int  # new processes per problem in section 4 (median)
    dtype: str
    threads: int
    tune_budget: float | None  # AUTOJAC_TUNE_BUDGET in effect (None: autojac's default)
    sections: tuple[int, ...]
    only: tuple[str, ...]


MODES: dict[str, dict[str, Any]] = {
    "full": dict(min_time=0.3, rounds=3, min_repeats=5, call_cap=2.0, chunks="all", coupled_rows=64,
                 oracle_twins=3, dispatch_rounds=21, dispatch_time=0.1, fresh_processes=3),
    "quick": dict(min_time=0.06, rounds=1, min_repeats=5, call_cap=0.5, chunks="first", coupled_rows=16,
                  oracle_twins=2, dispatch_rounds=7, dispatch_time=0.05, fresh_processes=1),
}


# -- shapes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A tanh MLP n -> hidden -> m (m None: a scalar per sample, (B,)) at batch size B."""

    batch: int
    n: int
    m: int | None
    hidden: tuple[int, ...] = (32, 32)

    @property
    def name(self) -> str:
        return f"{self.n}-{'-'.join(map(str, self.hidden))}-{self.m or 's'} B={self.batch}"

    @property
    def rows(self) -> int:
        return self.batch * (self.m or 1)

    def make(self, dtype: str, op: str, batch: int | None = None) -> tuple[nn.Module, Tensor, Tensor | None]:
        """(f, x, v), seeded: the same weights and inputs every time; v only for hvp."""
        torch.manual_seed(0)
        kind = getattr(torch, dtype)
        f = mlp(self.n, list(self.hidden), self.m).to(kind).eval()
        x = torch.randn(batch or self.batch, self.n, dtype=kind)
        return f, x, (torch.randn_like(x) if op == "hvp" else None)


S = Shape


@dataclass(frozen=True)
class Suite:
    """The problems each section measures."""

    first_order: tuple[Shape, ...]  # section 1 (and 2's lean oracle), the Jacobian
    second_order: tuple[Shape, ...]  # the same for every other operation
    grid: tuple[tuple[str, int], ...]  # section 2's design grid: (workload name, B)
    dispatch: tuple[tuple[str, Shape], ...]  # section 3: (op, shape)
    first_call: tuple[tuple[str, Shape], ...]  # section 4
    new_batch: tuple[tuple[str, Shape, tuple[int, ...]], ...]  # section 5: (op, shape tuned, new batch sizes)
    ode: Shape  # section 6: the state (B, n) and the MLP of the right-hand side (n + 1 -> n)
    closures: tuple[str, ...]  # section 6's closure forms (keys of CLOSURES)
    times: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)  # successive values of t (and training steps)


Dynamics = Callable[[float, Tensor], Tensor]


def _closure(dyn: Dynamics, t: float) -> Callable[[Tensor], Tensor]:
    return lambda z: dyn(t, z)  # t: a closure cell


def _partial(dyn: Dynamics, t: float) -> Callable[[Tensor], Tensor]:
    return functools.partial(dyn, t)


def _default(dyn: Dynamics, t: float) -> Callable[[Tensor], Tensor]:
    return lambda z, t=t: dyn(t, z)  # type: ignore[misc]  # t: a default argument


# How an ODE solver's step binds the time t to the right-hand side f(t, z), by name.
CLOSURES: dict[str, Callable[[Dynamics, float], Callable[[Tensor], Tensor]]] = {
    "lambda z: f(t, z)": _closure,
    "functools.partial(f, t)": _partial,
    "lambda z, t=t: f(t, z)": _default,
}

# The MLPs: two hidden layers of 32 or 48, B from 3 to 4096, n from 2 to 64, scalar and vector outputs.
FULL = Suite(
    first_order=(S(3, 5, 10), S(8, 3, None), S(64, 8, 8), S(256, 16, None, (48, 48)), S(1024, 2, None),
                 S(1024, 2, 3), S(4096, 2, None), S(32, 64, None, (48, 48)), S(128, 64, 16, (48, 48)),
                 S(512, 16, 64, (48, 48))),
    second_order=(S(8, 3, None), S(8, 3, 3), S(256, 8, None, (48, 48)), S(256, 8, 4, (48, 48)), S(1024, 2, None),
                  S(1024, 2, 3), S(64, 16, 4, (48, 48))),
    grid=tuple((w.name, b) for b in (1, 32, 512) for w in DESIGN_GRID),
    dispatch=(("jacobian", S(8, 3, None)), ("jacobian", S(3, 5, 10)), ("hvp", S(8, 3, None)),
              ("laplacian", S(64, 2, 3))),
    first_call=(("jacobian", S(8, 3, None)), ("jacobian", S(3, 5, 10)), ("jacobian", S(1024, 2, None)),
                ("hvp", S(256, 8, 4, (48, 48))), ("laplacian", S(1024, 2, 3)), ("hessian", S(64, 16, 4, (48, 48))),
                ("jacobian", S(512, 64, 64, (64, 64)))),
    new_batch=(("jacobian", S(256, 16, None, (48, 48)), (200, 384, 64, 1024)),
               ("jacobian", S(1024, 2, 3), (1000, 1536, 4096)),
               ("laplacian", S(1024, 2, None), (1000, 3000))),
    ode=S(64, 4, 4),
    closures=tuple(CLOSURES),
)
QUICK = Suite(
    first_order=(S(8, 3, None), S(3, 5, 10), S(1024, 2, None)),
    second_order=(S(8, 3, None), S(1024, 2, 3)),
    grid=(("mlp-2-64-64-1", 1), ("mlp-64-64-64-64", 32), ("mlp-2-64-64-512", 32), ("mlp-512-64-64-1", 32)),
    dispatch=FULL.dispatch[:2],
    first_call=(FULL.first_call[0], FULL.first_call[4]),
    new_batch=((FULL.new_batch[0][0], FULL.new_batch[0][1], (200, 1024)),),
    ode=FULL.ode,
    closures=tuple(CLOSURES)[:2],
)
SUITES = {"full": FULL, "quick": QUICK}


def shapes_for(op: str, suite: Suite) -> tuple[Shape, ...]:
    if op == "jacobian":
        return suite.first_order
    if op == "divergence":  # a vector field: as many outputs as inputs
        return tuple(dict.fromkeys(dataclasses.replace(s, m=s.n) for s in suite.second_order))
    return suite.second_order


def selected(name: str, settings: Settings) -> bool:
    return not settings.only or any(text in name for text in settings.only)


# -- timing ------------------------------------------------------------------------------------

def side_by_side(fns: dict[str, api.Run], settings: Settings, min_time: float | None = None,
                 rounds: int | None = None) -> dict[str, dict]:
    """Interleaved timing of fns: `rounds` separate comparisons of min_time / rounds seconds each.
    Per fn: the median of the rounds' medians ("median"), the rounds' medians, the calls timed, and
    each round's seconds ("seconds", for `paired`; not written to the results)."""
    rounds = rounds or settings.rounds
    per_round = (min_time if min_time is not None else settings.min_time) / rounds
    medians: dict[str, list[float]] = {name: [] for name in fns}
    seconds: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        samples = api.compare(dict[str, Callable[[], object]](fns), api.Clock(), min_time=per_round,
                              min_repeats=settings.min_repeats, max_repeats=100_000)
        for name, s in samples.items():
            medians[name].append(s.median)
            seconds[name].append(list(s.seconds))
    return {name: {"median": statistics.median(values), "rounds": values,
                   "calls": sum(map(len, seconds[name])), "seconds": seconds[name]}
            for name, values in medians.items()}


def paired(a: dict, b: dict, how: Callable[[float, float], float] = operator.truediv) -> float:
    """The median over calls made in the same interleaved round of how(a's, b's): drift in the
    machine's load between rounds cancels (a check on the ratio of medians, which it should match)."""
    values = [how(x, y) for xs, ys in zip(a["seconds"], b["seconds"]) for x, y in zip(xs, ys)]
    return statistics.median(values)


def once(fn: api.Run) -> tuple[Tensor, float]:
    return api.timed(api.Clock(), fn)


def agreement(got: Tensor | tuple[Tensor, ...], ref: Tensor | tuple[Tensor, ...]) -> tuple[bool, float | None]:
    """Whether a twin's result equals the strategy's, with a tolerance by dtype; the largest difference.
    Several quantities (derivatives) agree where each does."""
    if isinstance(got, tuple) or isinstance(ref, tuple):
        if not (isinstance(got, tuple) and isinstance(ref, tuple) and len(got) == len(ref)):
            return False, None
        pairs = [agreement(g, r) for g, r in zip(got, ref)]
        diffs = [d for _, d in pairs if d is not None]
        return all(ok for ok, _ in pairs), (max(diffs) if len(diffs) == len(pairs) else None)
    if not isinstance(got, Tensor) or got.shape != ref.shape:
        return False, None
    rtol, atol = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-3, 1e-4)}.get(ref.dtype, (1e-2, 1e-2))
    got, ref = got.detach(), ref.detach()
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    return bool(torch.allclose(got, ref, rtol=rtol, atol=atol * scale)), diff


def geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def say(text: str) -> None:
    print(text, flush=True)


# -- 1. twins ----------------------------------------------------------------------------------

def section_twins(settings: Settings, suite: Suite) -> list[dict]:
    rows: list[dict] = []
    for op in api.operations():
        for shape in shapes_for(op, suite):
            if not selected(f"{op} {shape.name}", settings):
                continue
            f, x, v = shape.make(settings.dtype, op)
            out_shape = api.tensor_out_shape(f, x)
            for strategy in api.strategies():
                if op not in strategy.ops:
                    continue
                head = dict(op=op, shape=shape.name, strategy=strategy.name)
                why = api.not_applicable(strategy, op, f, x, v)
                if not why and api.coupled_only(strategy) and shape.rows > settings.coupled_rows:
                    why = (f"kept for batch-coupled f (B times the work): timed only where "
                           f"B*m <= {settings.coupled_rows}")
                if why:
                    rows.append(dict(head, chunk=None, label=strategy.name, status="not timed", reason=why))
                    continue
                options = api.chunk_options(strategy, x, out_shape)
                for chunk in options if settings.chunks == "all" else options[:1]:
                    row = measure_pair(op, shape, strategy, chunk, f, x, v, out_shape, settings)
                    rows.append(row)
                    say(_pair_line(row))
    return rows


def measure_pair(op: str, shape: Shape, strategy: api.Strategy, chunk: int | None, f: nn.Module, x: Tensor,
                 v: Tensor | None, out_shape: tuple[int, ...], settings: Settings) -> dict:
    """One strategy at one chunk against its twin: first calls (checked), then timed side by side."""
    row: dict = dict(op=op, shape=shape.name, strategy=strategy.name, chunk=chunk,
                     label=api.label(strategy.name, chunk), status="ok", reason="")
    direct = api.strategy_call(strategy, op, f, x, v, chunk)
    try:
        twin = twins.make(strategy.name, twins.Spec(op, f, x, v, chunk, out_shape))
    except twins.NoTwin as why:
        twin, row["status"], row["reason"] = None, "no twin", str(why)
    try:
        reference, first = once(direct)
    except Exception as error:  # a strategy that fails here is a finding, not a crash
        return dict(row, status="error", reason=f"the strategy raised {type(error).__name__}: {error}"[:300])
    fns = {"strategy": direct}
    if twin is not None:
        try:
            result, twin_first = once(twin)
        except Exception as error:
            return dict(row, status="twin error", reason=f"the twin raised {type(error).__name__}: {error}"[:300])
        agrees, row["max_diff"] = agreement(result, reference)
        if not agrees:
            return dict(row, status="mismatch", reason=f"twin and strategy differ (max difference {row['max_diff']})")
        first = max(first, twin_first)
        fns["twin"] = twin
    if first > settings.call_cap:
        timings = {name: {"median": once(fn)[1], "rounds": [], "calls": 1, "seconds": []} for name, fn in fns.items()}
        row["reason"] = row["reason"] or f"timed by one call: its first call took over {settings.call_cap:g} s"
        row["single"] = True
    else:
        timings = side_by_side(fns, settings)
    row["strategy_s"] = timings["strategy"]["median"]
    row["calls"] = timings["strategy"]["calls"]
    if twin is not None:
        row["twin_s"] = timings["twin"]["median"]
        row["ratio"] = row["strategy_s"] / row["twin_s"]
        if not row.get("single"):
            row["paired_ratio"] = paired(timings["strategy"], timings["twin"])
        row["excess_s"] = row["strategy_s"] - row["twin_s"]
        row["meets"] = row["ratio"] <= TWIN_RATIO or row["excess_s"] <= TWIN_SLACK
    return row


def _pair_line(row: dict) -> str:
    head = f"[twins] {row['op']} {row['shape']} {row['label']}"
    if "twin_s" in row:
        flag = "" if row["meets"] else "  MISS"
        return (f"{head}: strategy {row['strategy_s'] * 1e6:.1f} us, twin {row['twin_s'] * 1e6:.1f} us, "
                f"{row['ratio']:.2f}x{flag}")
    if "strategy_s" in row:
        return f"{head}: strategy {row['strategy_s'] * 1e6:.1f} us ({row['status']})"
    return f"{head}: {row['status']}: {row['reason']}"


# -- 2. oracles --------------------------------------------------------------------------------

def section_lean_oracle(settings: Settings, suite: Suite, pairs: list[dict]) -> list[dict]:
    """autojac's tuned call against the fastest twins (and strategies) of section 1, per shape."""
    shapes = {s.name: s for op in api.operations() for s in shapes_for(op, suite)}
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in pairs:
        if "strategy_s" in row:
            groups.setdefault((row["op"], row["shape"]), []).append(row)
    results = []
    for (op, name), rows in groups.items():
        if not api.has_public_call(op):
            results.append(dict(op=op, shape=name, status="no public call", reason=f"autojac has no {op}"))
            continue
        ranked_twins = sorted((r for r in rows if "twin_s" in r), key=lambda r: r["twin_s"])[: settings.oracle_twins]
        ranked = sorted(rows, key=lambda r: r["strategy_s"])[:2]
        if not ranked_twins:
            results.append(dict(op=op, shape=name, status="no twin", reason="no strategy of this shape has a twin"))
            continue
        results.append(lean_oracle_case(op, shapes[name], ranked_twins, ranked, settings))
        say(_oracle_line(results[-1]))
    return results


def lean_oracle_case(op: str, shape: Shape, ranked_twins: list[dict], ranked: list[dict],
                     settings: Settings) -> dict:
    f, x, v = shape.make(settings.dtype, op)
    out_shape = api.tensor_out_shape(f, x)
    with api.fresh_planner():
        call = api.public_call(op, f, x, v)
        _, tuning = once(call)
        plan = api.explain(op, f, x, v)
        fns: dict[str, api.Run] = {"autojac": call}
        for row in ranked_twins:
            fns[f"twin {row['label']}"] = twins.make(row["strategy"], twins.Spec(op, f, x, v, row["chunk"], out_shape))
        for text in dict.fromkeys([*(r["label"] for r in ranked), plan.label]):
            name, chunk = api.parse_label(text)
            fns[f"direct {text}"] = api.strategy_call(api.get_strategy(name, op), op, f, x, v, chunk)
        timings = side_by_side(fns, settings)
    medians = {label: t["median"] for label, t in timings.items()}
    best_twin = min((label for label in medians if label.startswith("twin ")), key=lambda k: medians[k])
    best_own = min((label for label in medians if label.startswith("direct ")), key=lambda k: medians[k])
    ours = medians["autojac"]
    return dict(op=op, shape=shape.name, status="ok", chosen=plan.label, tuning_s=tuning, autojac_s=ours,
                lean_oracle=best_twin[5:], lean_oracle_s=medians[best_twin], lean_ratio=ours / medians[best_twin],
                lean_paired=paired(timings["autojac"], timings[best_twin]),
                own_oracle=best_own[7:], own_oracle_s=medians[best_own], own_regret=ours / medians[best_own],
                timings=medians)


def _oracle_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"[lean oracle] {row['op']} {row['shape']}: {row['status']}"
    return (f"[lean oracle] {row['op']} {row['shape']}: autojac {row['autojac_s'] * 1e6:.1f} us ({row['chosen']}), "
            f"lean oracle {row['lean_oracle']} {row['lean_oracle_s'] * 1e6:.1f} us: {row['lean_ratio']:.2f}x; "
            f"own {row['own_regret']:.2f}x")


def section_own_oracle(settings: Settings, suite: Suite) -> list[dict]:
    """docs/design.md's grid: autojac's tuned call against its own candidates called directly."""
    by_name = {w.name: w for w in DESIGN_GRID}
    results = []
    for workload, batch in ((by_name[name], b) for name, b in suite.grid):
        name = f"jacobian {workload.name} B={batch}"
        if not selected(name, settings):
            continue
        results.append(own_oracle_case(workload, batch, settings))
        row = results[-1]
        if row["status"] != "ok":
            say(f"[own oracle] {name}: {row['status']}: {row['reason']}")
            continue
        say(f"[own oracle] {name}: autojac {row['autojac_s'] * 1e6:.1f} us ({row['chosen']}), fastest "
            f"{row['own_oracle']} {row['own_oracle_s'] * 1e6:.1f} us: regret {row['regret']:.2f}")
    return results


def own_oracle_case(workload, batch: int, settings: Settings) -> dict:
    torch.manual_seed(0)
    kind = getattr(torch, settings.dtype)
    f = workload.build().to(kind).eval()
    x = torch.randn(batch, *workload.in_shape, dtype=kind)
    out_shape = api.tensor_out_shape(f, x)
    with api.fresh_planner():
        call = api.public_call("jacobian", f, x, None)
        _, tuning = once(call)
        plan = api.explain("jacobian", f, x, None)
        # Screening: one call each (after a warm-up); those the tuner itself timed at over 3x its
        # fastest are left out (they cannot be the oracle), as are those over 2x the fastest screened.
        measured = api.tuner_timings(plan)
        tuner_best = min(measured.values(), default=None)
        screened: dict[str, float] = {}
        notes: dict[str, str] = {}
        calls: dict[str, api.Run] = {}
        for name, chunk in api.own_candidates(plan, "jacobian", x, out_shape):
            text = api.label(name, chunk)
            if tuner_best and measured.get(text, 0.0) > 3 * tuner_best and text != plan.label:
                notes[text] = f"left out: the tuner timed it at {measured[text] / tuner_best:.1f}x its fastest"
                continue
            run = api.strategy_call(api.get_strategy(name, "jacobian"), "jacobian", f, x, None, chunk)
            try:
                _, warm = once(run)
                screened[text] = warm if warm > settings.call_cap else once(run)[1]
                calls[text] = run
            except Exception as error:
                notes[text] = f"raised {type(error).__name__}: {error}"[:200]
        if not screened:
            return dict(shape=f"{workload.name} B={batch}", status="failed", chosen=plan.label, tuning_s=tuning,
                        notes=notes, reason="no candidate ran")
        fastest = min(screened.values())
        keep = sorted((t for t in screened if screened[t] <= 2 * fastest), key=lambda k: screened[k])[:4]
        fns = {"autojac": call, **{f"direct {t}": calls[t] for t in dict.fromkeys([*keep, plan.label]) if t in calls}}
        slow = max(screened[t] for t in keep) > settings.call_cap  # seconds per call: one round will do
        timings = side_by_side(fns, settings, rounds=1 if slow else None)
    medians = {label: t["median"] for label, t in timings.items()}
    best = min((label for label in medians if label.startswith("direct ")), key=lambda k: medians[k])
    regret_paired = paired(timings["autojac"], timings[best])
    chosen = medians.get(f"direct {plan.label}")
    return dict(shape=f"{workload.name} B={batch}", status="ok", chosen=plan.label, tuning_s=tuning,
                autojac_s=medians["autojac"],
                own_oracle=best[7:], own_oracle_s=medians[best], regret=medians["autojac"] / medians[best],
                regret_paired=regret_paired,
                choice_alone=chosen / medians[best] if chosen else None, screened=screened, notes=notes,
                timings=medians)


# -- 3. hot path -------------------------------------------------------------------------------

def section_dispatch(settings: Settings, suite: Suite) -> list[dict]:
    results = []
    for op, shape in suite.dispatch:
        if not selected(f"dispatch {op} {shape.name}", settings) or not api.has_public_call(op):
            continue
        f, x, v = shape.make(settings.dtype, op)
        with api.fresh_planner():
            call = api.public_call(op, f, x, v)
            call()
            plan = api.explain(op, f, x, v)
            direct = api.strategy_call(api.get_strategy(plan.strategy, op), op, f, x, v, plan.chunk)
            timings = side_by_side({"autojac": call, "direct": direct}, settings,
                                   min_time=settings.dispatch_time * settings.dispatch_rounds,
                                   rounds=settings.dispatch_rounds)
        ours, theirs = timings["autojac"], timings["direct"]
        differences = [a - b for a, b in zip(ours["rounds"], theirs["rounds"])]
        overhead = statistics.median(differences)
        row: dict[str, Any] = dict(op=op, shape=shape.name, chosen=plan.label, autojac_s=ours["median"],
                                   direct_s=theirs["median"], overhead_s=overhead,
                                   overhead_paired_s=paired(ours, theirs, operator.sub), rounds=differences,
                                   calls=ours["calls"], meets=overhead <= DISPATCH_TARGET)
        results.append(row)
        say(f"[hot path] {op} {shape.name}: autojac {row['autojac_s'] * 1e6:.1f} us, {plan.label} directly "
            f"{row['direct_s'] * 1e6:.1f} us: overhead {overhead * 1e6:.1f} us")
    return results


# -- 4. first call -----------------------------------------------------------------------------

def section_first_call(settings: Settings, suite: Suite) -> list[dict]:
    results = []
    for op, shape in suite.first_call:
        if not selected(f"first call {op} {shape.name}", settings) or not api.has_public_call(op):
            continue
        warm = first_call(op, shape, settings)
        fresh = [fresh_process(op, shape, settings) for _ in range(settings.fresh_processes)]
        row = dict(op=op, shape=shape.name, chosen=warm["chosen"], tuned_s=warm["tuned_s"],
                   warm_first_s=warm["first_s"], warm_calls=warm["first_s"] / warm["tuned_s"],
                   warm_tunings=warm["tunings"])
        good = [r for r in fresh if "first_s" in r]
        if good:
            first = statistics.median(r["first_s"] for r in good)
            tuned = statistics.median(r["tuned_s"] for r in good)
            row.update(fresh_first_s=first, fresh_tuned_s=tuned, fresh_calls=first / tuned,
                       fresh_runs=[r["first_s"] for r in good])
        else:
            row["fresh_error"] = fresh[0].get("error", "no result") if fresh else "not run"
        target = max(FIRST_CALL_FLOOR, FIRST_CALL_CALLS * row["tuned_s"])
        row.update(target_s=target, applies=row["tuned_s"] < FIRST_CALL_BELOW,
                   meets_warm=row["warm_first_s"] <= target,
                   meets_fresh=row["fresh_first_s"] <= target if "fresh_first_s" in row else None)
        results.append(row)
        fresh_text = (f"fresh process {row['fresh_first_s'] * 1e3:.0f} ms ({row['fresh_calls']:.0f} calls)"
                      if "fresh_first_s" in row else f"fresh process: {row['fresh_error']}")
        say(f"[first call] {op} {shape.name}: tuned call {row['tuned_s'] * 1e6:.0f} us; warm process "
            f"{row['warm_first_s'] * 1e3:.0f} ms ({row['warm_calls']:.0f} calls); {fresh_text}")
    return results


def first_call(op: str, shape: Shape, settings: Settings) -> dict:
    """The first public call on a new problem with no plan, then the tuned call, in this process."""
    f, x, v = shape.make(settings.dtype, op)
    with api.fresh_planner() as watch:
        call = api.public_call(op, f, x, v)
        _, first = once(call)
        tuned = side_by_side({"tuned": call}, settings)["tuned"]["median"]
        chosen = api.explain(op, f, x, v).label
    return dict(first_s=first, tuned_s=tuned, chosen=chosen, tunings=len(watch.tunings))


def fresh_process(op: str, shape: Shape, settings: Settings) -> dict:
    """first_call in a new Python process (torch and autojac imported before the clock starts)."""
    return _in_new_process(dict(what="first call", op=op, shape=asdict(shape)), settings)


def section_startup(settings: Settings, suite: Suite) -> list[dict]:
    """torch.func's one-time start-up alone (a first vjp, vmap and jvp) in new processes: the
    part of a fresh process's first call that is not autojac's."""
    if not any(selected(f"first call {op} {shape.name}", settings) for op, shape in suite.first_call):
        return []
    runs = [_in_new_process(dict(what="startup"), settings) for _ in range(settings.fresh_processes)]
    seconds = [r["startup_s"] for r in runs if "startup_s" in r]
    row: dict[str, Any] = dict(startup_s=statistics.median(seconds) if seconds else None, runs=seconds)
    if not seconds:
        row["error"] = runs[0].get("error", "no result")
    say(f"[first call] torch.func start-up alone in a new process: "
        + (f"{row['startup_s'] * 1e3:.0f} ms" if seconds else row["error"]))
    return [row]


def _in_new_process(spec: dict, settings: Settings) -> dict:
    """Run `spec` (see _child) in a new Python process with this run's autojac and threads: its JSON answer."""
    source = str(Path(autojac.__file__).resolve().parent.parent)  # the autojac this run measures
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(settings.threads))
    text = json.dumps(dict(spec, settings=asdict(settings)))
    with tempfile.TemporaryDirectory() as cache:
        env["AUTOJAC_CACHE_DIR"] = cache  # no plan from the user's cache (the child plans in memory anyway)
        done = subprocess.run([sys.executable, "-m", "benchmarks.leanness", "--child", text], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(spec_text: str) -> None:
    """In a new process: the first call of a problem ("first call"), or torch.func's start-up ("startup")."""
    spec = json.loads(spec_text)
    settings = Settings(**{**spec["settings"], "sections": tuple(spec["settings"]["sections"]),
                           "only": tuple(spec["settings"]["only"])})
    torch.set_num_threads(settings.threads)
    if spec["what"] == "startup":
        x = torch.ones(2, 1)
        start = time.perf_counter()
        _, pull = torch.func.vjp(torch.sin, x)  # type: ignore[misc]
        torch.func.vmap(pull)(torch.ones(1, 2, 1))
        torch.func.vmap(lambda t: torch.func.jvp(torch.sin, (x,), (t,)))(torch.ones(1, 2, 1))
        print(json.dumps({"startup_s": time.perf_counter() - start}))
        return
    shape = Shape(**{**spec["shape"], "hidden": tuple(spec["shape"]["hidden"])})
    print(json.dumps(first_call(spec["op"], shape, settings)))


# -- 5. a new batch size -----------------------------------------------------------------------

def section_new_batch(settings: Settings, suite: Suite) -> list[dict]:
    results = []
    for op, shape, batches in suite.new_batch:
        for batch in batches:
            if not selected(f"new batch {op} {shape.name} -> {batch}", settings) or not api.has_public_call(op):
                continue
            results.append(new_batch(op, shape, batch, settings))
            row = results[-1]
            say(f"[new batch] {op} {shape.name} -> B={batch}: first call {row['first_s'] * 1e3:.1f} ms = "
                f"{row['calls']:.0f} tuned calls ({row['tuned_s'] * 1e6:.0f} us); tunings {row['tunings']}")
    return results


def new_batch(op: str, shape: Shape, batch: int, settings: Settings) -> dict:
    f, x, v = shape.make(settings.dtype, op)
    _, x2, v2 = shape.make(settings.dtype, op, batch=batch)
    with api.fresh_planner() as watch:
        _, tuning = once(api.public_call(op, f, x, v))
        plans, tunings = watch.plans(), len(watch.tunings)
        call = api.public_call(op, f, x2, v2)
        _, first = once(call)
        tuned = side_by_side({"tuned": call}, settings)["tuned"]["median"]
        facts = api.plan_facts(api.explain(op, f, x2, v2))
    ratio = batch / shape.batch
    retuned = len(watch.tunings) - tunings
    return dict(op=op, shape=shape.name, tuned_batch=shape.batch, batch=batch, within_2x=0.5 <= ratio <= 2,
                tuning_s=tuning, first_s=first, tuned_s=tuned, calls=first / tuned,
                plans_added=watch.plans() - plans, tunings=retuned, plan=facts,
                meets=first / tuned <= NEW_BATCH_CALLS and not retuned if 0.5 <= ratio <= 2 else None)


# -- 6. closure constants and growing state -----------------------------------------------------

def _ode(settings: Settings, shape: Shape) -> tuple[Callable[[float, Tensor], Tensor], Tensor]:
    """dyn(t, z), a neural ODE's right-hand side with time as an input, and a state z (B, n)."""
    torch.manual_seed(0)
    kind = getattr(torch, settings.dtype)
    net = mlp(shape.n + 1, list(shape.hidden), shape.n).to(kind).eval()

    def dyn(t: float, z: Tensor) -> Tensor:
        return net(torch.cat([z, z.new_full((z.shape[0], 1), t)], 1))

    return dyn, torch.randn(shape.batch, shape.n, dtype=kind)


class Tracked(nn.Module):
    """A model that keeps its training losses in a list attribute, as training loops often do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def section_closures(settings: Settings, suite: Suite) -> list[dict]:
    results = []
    problem = f"jacobian {suite.ode.name}"
    for variant in suite.closures:
        if not selected(f"closure {variant}", settings):
            continue
        make = CLOSURES[variant]
        dyn, z = _ode(settings, suite.ode)
        steps = []
        with api.fresh_planner() as watch:
            for t in suite.times:
                rhs = make(dyn, t)
                plans, tunings = watch.plans(), len(watch.tunings)
                _, seconds = once(lambda: autojac.jacobian(rhs, z))
                steps.append(dict(t=t, first_s=seconds, plans_added=watch.plans() - plans,
                                  tunings=len(watch.tunings) - tunings))
            tuned = side_by_side({"tuned": lambda: autojac.jacobian(rhs, z)}, settings)["tuned"]["median"]
            chosen = autojac.explain(rhs, z).label
        results.append(_steps_row(f"ODE right-hand side {variant}", problem, steps, tuned, chosen))
    if selected("closure module list attribute", settings):
        results.append(_growing_list(settings, suite))
    for row in results:
        later = row["steps"][1:]
        costs = ", ".join(f"{step['calls']:.0f}" for step in later)
        say(f"[closure] {row['case']}: later calls cost {costs} tuned calls ({row['tuned_s'] * 1e6:.0f} us, "
            f"{row['chosen']}); re-tuned {row['retuned_later']} of {len(later)}")
    return results


def _growing_list(settings: Settings, suite: Suite) -> dict:
    torch.manual_seed(0)
    kind, shape = getattr(torch, settings.dtype), suite.ode
    model = Tracked(mlp(shape.n, list(shape.hidden), shape.n).to(kind))
    x = torch.randn(shape.batch, shape.n, dtype=kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = []
    with api.fresh_planner() as watch:
        for step in range(len(suite.times)):
            plans, tunings = watch.plans(), len(watch.tunings)
            _, seconds = once(lambda: autojac.jacobian(model, x))
            steps.append(dict(step=step, losses=len(model.losses), first_s=seconds, plans_added=watch.plans() - plans,
                              tunings=len(watch.tunings) - tunings))
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.losses.append(loss.detach())
        tuned = side_by_side({"tuned": lambda: autojac.jacobian(model, x)}, settings)["tuned"]["median"]
        chosen = autojac.explain(model, x).label
    return _steps_row("module whose training loop appends detached losses to a list attribute",
                      f"jacobian {shape.name}", steps, tuned, chosen)


def _steps_row(case: str, problem: str, steps: list[dict], tuned: float, chosen: str) -> dict:
    for s in steps:
        s["calls"] = s["first_s"] / tuned
    return dict(case=case, problem=problem, tuned_s=tuned, chosen=chosen, steps=steps,
                retuned_later=sum(s["tunings"] > 0 for s in steps[1:]),
                plans_total=sum(s["plans_added"] for s in steps))


# -- the run -----------------------------------------------------------------------------------

def machine_record(settings: Settings) -> dict:
    return dict(
        cpu=_cpu_name(), hostname=socket.gethostname(), platform=platform.platform(),
        python=sys.version.split()[0], torch=torch.__version__, autojac=autojac.__version__,
        autojac_source=str(Path(autojac.__file__).resolve().parent),
        autojac_commit=_commit(Path(autojac.__file__).parent),
        benchmark_commit=_commit(Path(__file__).parent), threads=torch.get_num_threads(), cpu_count=os.cpu_count() or 1,
        load_average=load_average(),
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _commit(where: Path) -> str | None:
    """The git commit of the checkout holding `where`, with "+dirty" when files under `where` changed."""
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _warm_up(settings: Settings) -> None:
    """Pay torch.func's and autojac's one-time start-up before anything is timed in this process."""
    shape = S(4, 3, 2, (8,))
    for op in ("jacobian", "hvp"):
        f, x, v = shape.make(settings.dtype, op)
        with api.fresh_planner():
            api.public_call(op, f, x, v)()
    f, x, _ = shape.make(settings.dtype, "jacobian")
    torch.func.vmap(torch.func.jacrev(lambda xi: f(xi[None])[0]))(x)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leanness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timings (under 2 minutes)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="only cases whose name contains TEXT (repeatable): 'OP N-H-H-M B=B' in sections 1 and "
                             "2 (M 's': a scalar output), e.g. 'jacobian 3-32-32-s B=8', 'B=8', 'hessian'; the design "
                             "grid's 'jacobian mlp-2-64-64-1 B=1'; 'dispatch ...', 'first call ...', 'new batch ...', "
                             "'closure ...' in sections 3 to 6")
    parser.add_argument("--sections", default=",".join(map(str, SECTIONS)),
                        help="sections to run, e.g. 1,2 (section 2's lean oracle needs section 1)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-time", type=float, help="seconds of timed calls per contender and measurement")
    parser.add_argument("--tune-budget", type=float, help="set AUTOJAC_TUNE_BUDGET (default: as the environment says)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    values = dict(MODES["quick" if args.quick else "full"])
    if args.min_time is not None:
        values["min_time"] = args.min_time
    if args.tune_budget is not None:
        os.environ["AUTOJAC_TUNE_BUDGET"] = str(args.tune_budget)
    budget = os.environ.get("AUTOJAC_TUNE_BUDGET", "").strip()
    try:
        sections = tuple(sorted({int(s) for s in args.sections.split(",") if s.strip()}))
    except ValueError:
        raise SystemExit(f"--sections {args.sections!r}: expected numbers from 1 to 6 separated by commas") from None
    if not set(sections) <= set(SECTIONS):
        raise SystemExit(f"--sections {args.sections!r}: sections are 1 to 6")
    return Settings(mode="quick" if args.quick else "full", dtype=args.dtype, threads=torch.get_num_threads(),
                    tune_budget=float(budget) if budget else None, sections=sections, only=tuple(args.only),
                    **values)


def run(settings: Settings, command: str, suite: Suite | None = None) -> dict:
    """Every selected section on `suite` (the mode's by default); the record written to JSON."""
    suite = suite or SUITES[settings.mode]
    started, created = time.perf_counter(), datetime.now(timezone.utc)
    machine = machine_record(settings)
    say(f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, autojac {machine['autojac']} "
        f"({machine['autojac_commit'] or machine['autojac_source']}), load average {machine['load_average']}")
    notes = []
    busy = busy_note(machine["load_average"], machine["cpu_count"], "when the run started")
    if busy:
        notes.append(busy)
        if machine["threads"] > 1:
            notes.append(f"{machine['threads']} torch threads on a busy machine: a thread waiting for a core stalls "
                         f"small calls for milliseconds; --threads 1 gives steadier figures there")
        for note in notes:
            say(f"note: {note}")
    if os.environ.get("AUTOJAC_TUNE", "").strip().lower() in ("0", "off", "false", "no"):
        notes.append("AUTOJAC_TUNE is off: autojac's figures are its heuristic choices")
    _warm_up(settings)
    record: dict = dict(schema=SCHEMA, created=created.isoformat(), command=command, machine=machine,
                        settings=asdict(settings), suite=asdict(suite), notes=notes, sections={}, section_seconds={})
    wanted = set(settings.sections)
    if 2 in wanted and 1 not in wanted:
        notes.append("section 2's lean oracle needs section 1's twins: section 1 ran too")
        wanted.add(1)
    steps: list[tuple[int, str, Callable[[], list[dict]]]] = [
        (1, "twins", lambda: section_twins(settings, suite)),
        (2, "lean_oracle", lambda: section_lean_oracle(settings, suite, record["sections"]["twins"])),
        (2, "own_oracle", lambda: section_own_oracle(settings, suite)),
        (3, "dispatch", lambda: section_dispatch(settings, suite)),
        (4, "first_call", lambda: section_first_call(settings, suite)),
        (4, "startup", lambda: section_startup(settings, suite)),
        (5, "new_batch", lambda: section_new_batch(settings, suite)),
        (6, "closures", lambda: section_closures(settings, suite)),
    ]
    for number, key, measure in steps:
        if number in wanted:
            begun = time.perf_counter()
            record["sections"][key] = measure()
            record["section_seconds"][key] = time.perf_counter() - begun
    record["summary"] = summarize(record["sections"])
    record["seconds"] = time.perf_counter() - started
    record["load_average_end"] = load_average()
    end = busy_note(record["load_average_end"], machine["cpu_count"], "when the run ended", own=machine["threads"])
    if end:
        notes.append(end)
    return record


def summarize(sections: dict) -> dict:
    """The headline figures and whether each target was met."""
    summary: dict = {}
    pairs = [r for r in sections.get("twins", []) if "ratio" in r]
    if pairs:
        by_strategy: dict[str, list[float]] = {}
        for r in pairs:
            by_strategy.setdefault(r["strategy"], []).append(r["ratio"])
        summary["twins"] = dict(
            pairs=len(pairs), misses=sum(not r["meets"] for r in pairs), geomean=geomean([r["ratio"] for r in pairs]),
            paired_geomean=geomean([r["paired_ratio"] for r in pairs if "paired_ratio" in r]),
            worst=max(pairs, key=lambda r: r["ratio"])["ratio"],
            per_strategy={name: dict(geomean=geomean(v), worst=max(v), pairs=len(v))
                          for name, v in by_strategy.items()},
            no_twin=sorted({r["strategy"] for r in sections["twins"] if r["status"] == "no twin"}),
            mismatches=[f"{r['op']} {r['shape']} {r['label']}" for r in sections["twins"] if r["status"] == "mismatch"],
        )
    lean = [r for r in sections.get("lean_oracle", []) if r.get("status") == "ok"]
    if lean:
        ratios = [r["lean_ratio"] for r in lean]
        middle = geomean(ratios) or 0.0
        summary["lean_oracle"] = dict(cases=len(lean), geomean=middle, worst=max(ratios),
                                      paired_geomean=geomean([r["lean_paired"] for r in lean]),
                                      meets=middle <= LEAN_GEOMEAN and max(ratios) <= LEAN_WORST,
                                      own_geomean=geomean([r["own_regret"] for r in lean]),
                                      own_worst=max(r["own_regret"] for r in lean))
    own = [r for r in sections.get("own_oracle", []) if r["status"] == "ok"]
    if own:
        regrets = [r["regret"] for r in own]
        middle = geomean(regrets) or 0.0
        summary["own_oracle"] = dict(cases=len(own), geomean=middle, worst=max(regrets),
                                     meets=middle <= OWN_GEOMEAN and max(regrets) <= OWN_WORST,
                                     choice_alone_geomean=geomean([r["choice_alone"] for r in own
                                                                   if r["choice_alone"]]))
    dispatch = sections.get("dispatch", [])
    if dispatch:
        summary["dispatch"] = dict(median_overhead_s=statistics.median(r["overhead_s"] for r in dispatch),
                                   worst_overhead_s=max(r["overhead_s"] for r in dispatch),
                                   meets=all(r["meets"] for r in dispatch))
    first = [r for r in sections.get("first_call", []) if r["applies"]]
    if first:
        startup = sections.get("startup") or [{}]
        summary["first_call"] = dict(torch_func_startup_s=startup[0].get("startup_s"),
            cases=len(first), warm_calls_geomean=geomean([r["warm_calls"] for r in first]),
            fresh_calls_geomean=geomean([r["fresh_calls"] for r in first if "fresh_calls" in r]),
            meets_warm=all(r["meets_warm"] for r in first),
            meets_fresh=all(r["meets_fresh"] for r in first if r["meets_fresh"] is not None))
    batches = sections.get("new_batch", [])
    if batches:
        within = [r for r in batches if r["within_2x"]]
        summary["new_batch"] = dict(cases=len(batches),
                                    within_2x_calls_worst=max((r["calls"] for r in within), default=None),
                                    within_2x_meets=all(r["meets"] for r in within),
                                    retuned=sum(r["tunings"] > 0 for r in batches))
    closures = sections.get("closures", [])
    if closures:
        summary["closures"] = dict(retuned_later=sum(r["retuned_later"] for r in closures),
                                   later_calls=sum(len(r["steps"]) - 1 for r in closures))
    return summary


def stem(record: dict) -> str:
    cpu = "".join(c if c.isalnum() else "-" for c in record["machine"]["cpu"].lower()).strip("-")
    cpu = "-".join(filter(None, cpu.split("-")))[:32]
    commit = (record["machine"]["autojac_commit"] or "unknown").replace("+", "-")
    return f"leanness-{cpu}-{record['created'][:10]}-{record['settings']['mode']}-{commit}"


def write(record: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = stem(record)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(record, indent=1))
    paths[1].write_text(lean_report.markdown(record))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from(args)
    record = run(settings, " ".join(["python -m benchmarks.leanness", *map(shlex.quote, argv)]))
    paths = write(record, args.out)
    for line in lean_report.headline(record):
        say(line)
    say("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
