"""The benchmark runner: `python -m benchmarks.run [--quick] [--suite NAME ...] [--only TEXT ...]`.

Writes, into --out (default: the user cache dir's autojac-benchmarks, outside the source tree;
--publish: benchmarks/results, the published figures): DEVICE-DATE-MODE.json (validated by
`benchmarks.schema.Run`), the same stem .md (tables) and .png (speed-ups), and, for a full run
or with --summary, SUMMARY.md, the README's benchmark section.

`--merge A.json B.json ...` joins runs of single suites made one after another on the same
machine with the same settings (a long run split so that an interruption loses one suite, not
all): the joined run is a full one when its suites are the full set.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import platformdirs
import torch

import autojac
from autojac import config
from autojac.cache import write_atomically
from autojac.planner import Planner, set_default_planner
from autojac.store import MemoryStore
from autojac.timing import TuneSettings

from . import report
from .machine import BUSY, busy_note, describe, load_average
from .measure import available_ops, measure_case
from .schema import CaseResult, Machine, Run, Settings
from .workloads import FULL, SUITES, Case, suite

RESULTS = Path(__file__).resolve().parent / "results"  # the published figures: written only with --publish


def default_out() -> Path:
    """Where a run writes unless told: outside the source tree (~/.cache/autojac-benchmarks on Linux)."""
    return platformdirs.user_cache_path("autojac-benchmarks")

# Per mode: seconds and repeats of timing per contender, single-call and stop caps, the case estimate cap,
# chunk sizes, coupled-only strategies, peak memory, seconds per side of the dispatch comparison,
# autojac's tuning budget (None: AUTOJAC_TUNE_BUDGET or autojac's default).
MODES = {
    "full": dict(min_time=0.2, min_repeats=7, repeat_cap=1.0, call_cap=15.0, tune_cap=300.0, estimate_cap=20.0,
                 chunks="all", coupled_only=True, memory="key", dispatch_time=0.5, tune_budget=None),
    "quick": dict(min_time=0.03, min_repeats=3, repeat_cap=0.2, call_cap=1.0, tune_cap=30.0, estimate_cap=1.0,
                  chunks="unchunked", coupled_only=False, memory="none", dispatch_time=0.1, tune_budget=0.5),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick suite with short timings (< 2 min on 2 cores)")
    parser.add_argument("--suite", action="append", choices=list(SUITES),
                        help=f"suites to run (repeatable); default: {', '.join(FULL)} (quick: quick)")
    parser.add_argument("--only", action="append", metavar="TEXT", help="only workloads whose name contains TEXT")
    parser.add_argument("--ops", action="append", metavar="OP", help="only these operations (repeatable)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help=f"where to write the results (default: {default_out()})")
    parser.add_argument("--publish", action="store_true",
                        help=f"write them into the repository's published figures, {RESULTS}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before measuring")
    parser.add_argument("--min-time", type=float, help="seconds of timed calls per contender")
    parser.add_argument("--call-cap", type=float, help="stop a call after this many seconds")
    parser.add_argument("--tune-budget", type=float, help="AUTOJAC_TUNE_BUDGET for autojac's tuning (seconds)")
    parser.add_argument("--chunks", choices=("all", "unchunked"), help="chunk sizes of the fixed strategies")
    parser.add_argument("--memory", choices=("none", "key", "all"),
                        help="CPU peak memory (a subprocess per contender): never; for B >= 512 of autojac's "
                             "choice, the oracle and the baselines (full default); of every contender")
    parser.add_argument("--no-coupled-only", dest="coupled_only", action="store_false", default=None,
                        help="do not time the strategies autojac keeps for batch-coupled f (full_diag, full_hessian, "
                             "full_hvp) on batch-independent f: at B >= 512 they take most of a full run's time")
    parser.add_argument("--summary", action="store_true", help="also write SUMMARY.md (a full run always does)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="RUN.json",
                        help="join these runs (same machine and settings, different suites) and write the reports")
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    """--out, else benchmarks/results with --publish, else `default_out()`."""
    if args.publish and args.out is not None and args.out.resolve() != RESULTS:
        raise SystemExit(f"--publish writes into {RESULTS}; leave out --out {args.out}, or --publish")
    return RESULTS if args.publish else args.out or default_out()


def _settings(args: argparse.Namespace, argv: Sequence[str], ops: list[str]) -> Settings:
    base = "quick" if args.quick else "full"
    values = dict(MODES[base])
    for key in ("min_time", "call_cap", "tune_budget", "chunks", "memory", "coupled_only"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if values["tune_budget"] is not None:
        os.environ["AUTOJAC_TUNE_BUDGET"] = str(values["tune_budget"])
    values["tune_budget"] = TuneSettings.from_env().budget
    suites = args.suite or (["quick"] if args.quick else list(FULL))
    mode = "custom" if args.suite or args.only or args.ops else base
    command = " ".join(["python -m benchmarks.run", *map(shlex.quote, argv)])
    return Settings(mode=mode, suites=suites, ops=ops, command=command, **values)


def _cases(settings: Settings, only: list[str] | None) -> list[Case]:
    cases = [c for name in settings.suites for c in suite(name, tuple(settings.ops))]
    if only:
        cases = [c for c in cases if any(text in c.workload.name for text in only)]
    return cases


def _warm_up(device: torch.device) -> None:
    """Pay torch.func's and autojac's one-time start-up before the first case is timed."""
    old = set_default_planner(Planner(store=MemoryStore()))
    try:
        autojac.jacobian(torch.nn.Linear(3, 2).to(device), torch.randn(4, 3, device=device))
    finally:
        set_default_planner(old)


def _line(i: int, total: int, result: CaseResult) -> str:
    head = f"[{i}/{total}] {result.suite} {result.op} {report.case_name(result)}"
    if result.status != "ok":
        return f"{head}: {result.status}: {result.reason}"
    regret = "-" if result.regret is None else f"{result.regret:.2f}"
    speedup = "-" if result.speedup_tutorial is None else f"{result.speedup_tutorial:.2f}x"
    return (f"{head}: autojac {result.autojac * 1e3:.3g} ms ({result.chosen}), oracle {result.oracle}, "
            f"regret {regret}, vs {result.tutorial} {speedup} [{result.seconds:.1f} s]")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.out = output_dir(args)
    if args.merge:
        try:
            run = merge([Run.model_validate_json(path.read_text()) for path in args.merge])
        except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            raise SystemExit(f"--merge: {error}") from None
        return _finish(run, args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops, notes = available_ops()
    if not config.tuning_enabled(None):
        notes.append("AUTOJAC_TUNE is off: autojac's figures are its heuristic choices, not tuned ones")
    if args.ops:
        unknown = sorted(set(args.ops) - set(ops))
        if unknown:
            raise SystemExit(f"--ops {', '.join(unknown)}: not available; available: {', '.join(ops)}")
        ops = [op for op in ops if op in args.ops]
    settings = _settings(args, argv, ops)
    cases = _cases(settings, args.only)
    if not cases:
        raise SystemExit("no case to run: check --suite, --only and --ops" + "".join(f"\n  {n}" for n in notes))
    started, created = time.perf_counter(), datetime.now(timezone.utc)
    machine = describe(device, sorted({c.dtype for c in cases}), quick=settings.mode == "quick")
    print(report.machine_line(machine))
    for note in [*notes, busy_note(machine.load_average, machine.cpu_count, "now")]:
        if note:
            print(f"note: {note}")
    _warm_up(device)
    results: list[CaseResult] = []

    def so_far(extra: list[str]) -> Run:
        end_load = load_average()
        return Run(created=created, seconds=time.perf_counter() - started, machine=machine, settings=settings,
                   notes=[*notes, *extra, *_busy_notes(machine, end_load)], cases=results,
                   summaries=report.summaries(results), load_average_end=end_load,
                   dispatch_overhead_median=report.dispatch_median(results))

    checkpoint = None
    for i, case in enumerate(cases, 1):
        result = measure_case(case, settings, machine, device)
        results.append(result)
        print(_line(i, len(cases), result), flush=True)
        if i < len(cases):  # a run killed later (out of memory, a deadline) keeps what it measured
            checkpoint = _checkpoint(so_far([f"partial: the run stopped after {i} of {len(cases)} cases"]), args.out)
    code = _finish(so_far([]), args)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return code


def _checkpoint(run: Run, out: Path) -> Path:
    """The run so far, as DEVICE-DATE-MODE.partial.json (written atomically); a valid run to merge."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem(run)}.partial.json"
    write_atomically(path, run.model_dump_json(indent=1).encode(), private=False)
    return path


def _busy_notes(machine: Machine, end_load: list[float], inherited: int = 0) -> list[str]:
    """Notes for a run that other work competed with, at its start or at its end; `inherited`:
    threads of a run that ended just before this one started (the 1-minute load average still
    counts them)."""
    notes = (busy_note(machine.load_average, machine.cpu_count, "when the run started", own=inherited),
             busy_note(end_load, machine.cpu_count, "when the run ended", own=machine.threads))
    return [note for note in notes if note]


def _judged_load_notes(runs: Sequence[Run]) -> list[str]:
    """The load notes of runs made one after another (suites run one by one), judged again."""
    notes, previous = [], None
    for run in sorted(runs, key=lambda r: r.created):
        # five minutes on, the 1-minute load average keeps under 1% of what the previous run added
        follows = previous is not None and 0 <= (run.created - previous.created).total_seconds() - previous.seconds < 300
        notes += _busy_notes(run.machine, run.load_average_end, previous.machine.threads if follows else 0)
        previous = run
    return notes


def _finish(run: Run, args: argparse.Namespace) -> int:
    paths = write(run, args.out, plot=not args.no_plot, summary=args.summary or run.settings.mode == "full")
    for line in report.headline_table(run, [g for g in run.summaries if g.suite == report.ALL]):
        print(line)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# What must match for runs to be joined: the machine and every setting but the suites.
_SAME_MACHINE = ("device", "device_name", "hostname", "torch", "autojac", "python", "threads")
_PER_SUITE = {"mode", "suites", "command", "ops"}  # ops: each case names its own


def merge(runs: Sequence[Run]) -> Run:
    """One run from runs of different suites made on the same machine with the same settings:
    cases in the given order, aggregates recomputed. ValueError names what differs."""
    if not runs:
        raise ValueError("no run to merge")
    first = runs[0]
    settings = first.settings.model_dump(exclude=_PER_SUITE)
    suites: list[str] = []
    for run in runs:
        for field in _SAME_MACHINE:
            if getattr(run.machine, field) != getattr(first.machine, field):
                raise ValueError(f"runs from different machines or versions: {field} is "
                                 f"{getattr(first.machine, field)!r} in one, {getattr(run.machine, field)!r} in another")
        other = run.settings.model_dump(exclude=_PER_SUITE)
        differing = sorted(key for key in settings if settings[key] != other[key])
        if differing:
            raise ValueError(f"runs with different settings ({', '.join(differing)}); run them alike and merge again")
        repeated = sorted(set(suites) & set(run.settings.suites))
        if repeated:
            raise ValueError(f"suite {', '.join(repeated)} appears in two runs; merge each suite once")
        suites += run.settings.suites
    full = dict(MODES["full"], tune_budget=settings["tune_budget"])
    every_op = all(set(run.settings.ops) == set(first.settings.ops) for run in runs)
    is_full = every_op and set(suites) == set(FULL) and all(settings[key] == value for key, value in full.items())
    cases = [c for run in runs for c in run.cases]
    # the load notes are judged again, run by run, by the current rule
    notes = list(dict.fromkeys([*(note for run in runs for note in run.notes if not note.startswith(BUSY)),
                                *_judged_load_notes(runs)]))
    return Run(created=min(run.created for run in runs), seconds=sum(run.seconds for run in runs),
               machine=first.machine, notes=notes, cases=cases, summaries=report.summaries(cases),
               settings=first.settings.model_copy(update=dict(
                   mode="full" if is_full else "custom", suites=suites,
                   ops=list(dict.fromkeys(op for run in runs for op in run.settings.ops)),
                   command=" && ".join(run.settings.command for run in runs))),
               load_average_end=runs[-1].load_average_end, dispatch_overhead_median=report.dispatch_median(cases))


def stem(run: Run) -> str:
    """DEVICE-DATE-MODE, e.g. cpu-amd-epyc-2025-01-31-full."""
    mode = run.settings.mode if run.settings.mode != "custom" else "+".join(run.settings.suites)
    return f"{run.machine.slug}-{run.created:%Y-%m-%d}-{mode}"


def write(run: Run, out: Path, *, plot: bool = True, summary: bool = False) -> list[Path]:
    """The JSON, the Markdown report, the plot, and (if asked) SUMMARY.md; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    name = stem(run)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(run.model_dump_json(indent=1))
    Run.model_validate_json(paths[0].read_text())  # what was written reads back as a valid run
    paths[1].write_text(report.markdown(run))
    png = out / f"{name}.png"
    if plot and report.plot(run, png):
        paths.append(png)
    if summary:
        image = _repo_relative(png) if png in paths else None
        paths.append(out / "SUMMARY.md")
        paths[-1].write_text(report.readme_fragment(run, image))
    return paths


def _repo_relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(RESULTS.parents[1]).as_posix()
    except ValueError:
        return path.name


if __name__ == "__main__":
    sys.exit(main())
