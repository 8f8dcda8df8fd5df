"""What a run says, for people: aggregates, the Markdown report, the README fragment, the plot."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from autojac.models import parse_label

from .schema import TIMED, CaseResult, GroupSummary, Machine, Run

INSTALL = 'python -m pip install -e ".[bench]"'
ALL = "all"
CHOICE_ALONE = ("'Choice alone' is the chosen strategy's time as a fixed contender over the oracle's: the "
                "quality of the choice apart from autojac's dispatch and the noise between two timings of the "
                "same work.")


def geomean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def dispatch_median(cases: list[CaseResult]) -> float | None:
    """The median dispatch overhead of a tuned call over the cases where it was measured."""
    return median([c.dispatch.overhead for c in cases if c.dispatch is not None])


def case_name(case: CaseResult) -> str:
    """'mlp-2-64-64-64 B=32' (with the dtype when it is not float32)."""
    dtype = "" if case.dtype == "float32" else f" {case.dtype}"
    return f"{case.workload} B={case.batch}{dtype}"


def _strategy_times(case: CaseResult) -> dict[str, float]:
    """Each fixed strategy's best time over its chunk sizes, where it ran and agreed."""
    best: dict[str, float] = {}
    for m in case.measurements:
        if m.kind == "fixed" and m.status in TIMED and m.agrees and m.median:
            name = parse_label(m.label)[0]
            best[name] = min(best.get(name, math.inf), m.median)
    return best


def choice_regret(case: CaseResult) -> float | None:
    """The chosen strategy's time as a fixed contender over the oracle's: regret without autojac's
    own dispatch and without the noise between two timings of the same work."""
    chosen = next((m for m in case.measurements if m.label == case.chosen and m.kind == "fixed"), None)
    if chosen is None or chosen.status not in TIMED or not chosen.median or not case.oracle_time:
        return None
    return chosen.median / case.oracle_time


def summarize(cases: list[CaseResult], suite: str, op: str) -> GroupSummary:
    """Aggregates over `cases` (already those of one suite and operation, or any mix)."""
    measured = [c for c in cases if c.status == "ok" and c.regret is not None]
    worst = max(measured, key=lambda c: c.regret or 0.0, default=None)
    wins: dict[str, int] = defaultdict(int)
    slowdowns: dict[str, list[float]] = defaultdict(list)
    for c in measured:
        wins[parse_label(c.oracle or "")[0]] += 1
        for name, seconds in _strategy_times(c).items():
            slowdowns[name].append(seconds / (c.oracle_time or seconds))
    choices = [r for r in map(choice_regret, measured) if r is not None]
    return GroupSummary(
        suite=suite, op=op, cases=len(cases), measured=len(measured),
        regret_geomean=geomean(c.regret for c in measured),
        regret_worst=worst.regret if worst else None,
        regret_worst_case=case_name(worst) if worst else None,
        within_110=sum(c.regret <= 1.10 for c in measured) / len(measured) if measured else None,
        choice_regret_geomean=geomean(choices), choice_regret_worst=max(choices, default=None),
        speedup_tutorial_geomean=geomean(c.speedup_tutorial for c in measured if c.speedup_tutorial),
        speedup_full_geomean=geomean(c.speedup_full for c in measured if c.speedup_full),
        tuning_seconds_median=median([c.tuning_seconds for c in measured if c.tuning_seconds is not None]),
        wins=dict(sorted(wins.items(), key=lambda kv: -kv[1])),
        slowdown_geomean={k: geomean(v) for k, v in sorted(slowdowns.items())},
        slowdown_worst={k: max(v) for k, v in sorted(slowdowns.items())},
    )


def summaries(cases: list[CaseResult]) -> list[GroupSummary]:
    """Per suite and operation, per operation over all suites, and over everything."""
    groups: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for c in cases:
        groups[(c.suite, c.op)].append(c)
        groups[(ALL, c.op)].append(c)
        groups[(ALL, ALL)].append(c)
    return [summarize(members, suite, op) for (suite, op), members in groups.items()]


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def _speedup(value: float | None, at_least: bool) -> str:
    return "-" if value is None else f"{'>=' if at_least else ''}{value:.2f}x"


def machine_line(m: Machine) -> str:
    ceiling = ", ".join(f"{d} {f / 1e9:.0f} GFLOP/s" for d, f in m.matmul_flops.items())
    return (f"{m.device_name} ({m.device}), {m.threads} threads, torch {m.torch}, Python {m.python}, "
            f"autojac {m.autojac}; matmul ceiling: {ceiling}; load average {', '.join(map(str, m.load_average)) or '-'}")


def headline_table(run: Run, groups: list[GroupSummary]) -> list[str]:
    lines = ["| suite | op | cases | measured | regret (geomean) | worst regret | regret <= 1.10 "
             "| choice alone (geomean, worst) | speed-up over tutorial | over full-batch | tuning (median s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        worst = f"{_fmt(g.regret_worst)} ({g.regret_worst_case})" if g.regret_worst else "-"
        share = "-" if g.within_110 is None else f"{g.within_110:.0%}"
        choice = f"{_fmt(g.choice_regret_geomean)}, {_fmt(g.choice_regret_worst)}"
        lines.append(f"| {g.suite} | {g.op} | {g.cases} | {g.measured} | {_fmt(g.regret_geomean)} | {worst} | {share} "
                     f"| {choice} | {_fmt(g.speedup_tutorial_geomean, '.2f', 'x')} | {_fmt(g.speedup_full_geomean, '.2f', 'x')} "
                     f"| {_fmt(g.tuning_seconds_median, '.2f')} |")
    return lines


def strategy_table(group: GroupSummary) -> list[str]:
    """The table of docs/design.md's grid: each fixed strategy's shapes won and slowdown against the oracle."""
    lines = ["| strategy | shapes won | geometric-mean slowdown | worst slowdown |", "|---|---|---|---|"]
    for name in sorted(group.slowdown_geomean, key=lambda n: (-group.wins.get(n, 0), group.slowdown_geomean[n])):
        lines.append(f"| `{name}` | {group.wins.get(name, 0)} | {group.slowdown_geomean[name]:.2f} "
                     f"| {group.slowdown_worst[name]:.3g} |")
    return lines


def case_table(cases: list[CaseResult]) -> list[str]:
    lines = ["| workload | B | in -> out | dtype | autojac ms | chosen | oracle ms | oracle | regret "
             "| vs tutorial | vs full | tuning s | GFLOP/s (share of ceiling) | dispatch us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if c.status != "ok":
            continue
        shape = f"{tuple(c.in_shape)} -> {tuple(c.out_shape or ())}"
        gflops = "-" if c.achieved_flops is None else f"{c.achieved_flops / 1e9:.3g} ({c.ceiling_fraction:.2g})"
        dispatch = "-" if c.dispatch is None else f"{c.dispatch.overhead * 1e6:.1f}"
        lines.append(f"| {c.workload} | {c.batch} | {shape} | {c.dtype} | {_ms(c.autojac)} | `{c.chosen}` "
                     f"| {_ms(c.oracle_time)} | `{c.oracle}` | {_fmt(c.regret)} "
                     f"| {_speedup(c.speedup_tutorial, c.speedup_tutorial_at_least)} "
                     f"| {_speedup(c.speedup_full, c.speedup_full_at_least)} | {_fmt(c.tuning_seconds)} "
                     f"| {gflops} | {dispatch} |")
    return lines


def problems(cases: list[CaseResult]) -> list[str]:
    """Skipped and failed cases, and contenders that timed out, failed or disagreed."""
    lines = []
    for c in cases:
        if c.status != "ok":
            lines.append(f"- {c.suite} {c.op} {case_name(c)}: {c.status}: {c.reason}")
            continue
        for m in c.measurements:
            if m.status in ("timeout", "oom", "error") or m.agrees is False:
                lines.append(f"- {c.suite} {c.op} {case_name(c)}: `{m.label}` {m.status}: {m.reason}")
    return lines


def targets(run: Run) -> list[str]:
    """The issue's targets, each met or missed, and the shapes that miss the worst-regret one."""
    overall = next((g for g in run.summaries if g.suite == ALL and g.op == ALL), None)
    jacobian = [c for c in run.cases if c.op == "jacobian" and c.tutorial == "vmap(jacrev)" and c.speedup_tutorial]
    speedup = geomean(c.speedup_tutorial for c in jacobian)
    overhead = run.dispatch_overhead_median

    def line(name: str, value: float | None, limit: float, below: bool, shown: str) -> str:
        if value is None:
            return f"- {name}: not measured"
        met = value <= limit if below else value >= limit
        return f"- {name}: {shown} ({'met' if met else 'MISSED'}; target {'<=' if below else '>='} {limit:g})"

    lines = [
        line("geometric-mean regret, all shapes and operations", overall and overall.regret_geomean, 1.10, True,
             _fmt(overall and overall.regret_geomean)),
        line("worst regret", overall and overall.regret_worst, 1.5, True, _fmt(overall and overall.regret_worst)),
        line("geometric-mean speed-up over vmap(jacrev)", speedup, 2.5, False, _fmt(speedup, ".2f", "x")),
        line("dispatch overhead of a tuned call (us, median)", overhead and overhead * 1e6, 50, True,
             _fmt(overhead and overhead * 1e6, ".1f")),
    ]
    over = sorted((c for c in run.cases if c.regret and c.regret > 1.5), key=lambda c: -c.regret)
    for c in over:
        lines.append(f"  - regret {c.regret:.2f}: {c.suite} {c.op} {case_name(c)}: autojac chose `{c.chosen}` "
                     f"({_ms(c.autojac)} ms), the fastest was `{c.oracle}` ({_ms(c.oracle_time)} ms)")
    return lines


def _by_group(cases: list[CaseResult]) -> dict[tuple[str, str], list[CaseResult]]:
    groups: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for c in cases:
        groups[(c.suite, c.op)].append(c)
    return groups


def markdown(run: Run) -> str:
    """The full report of a run."""
    out = [f"# autojac benchmark: {run.machine.device_name}, {run.created:%Y-%m-%d}", "",
           machine_line(run.machine), "",
           f"Mode `{run.settings.mode}`, suites {', '.join(run.settings.suites)}, operations "
           f"{', '.join(run.settings.ops)}; fixed strategies at {run.settings.chunks} chunk sizes; "
           f"autojac's tuning budget {run.settings.tune_budget:g} s per plan; {run.seconds:.0f} s in all. "
           f"Command: `{run.settings.command}`", "",
           "Regret is autojac's tuned public call over the fastest fixed strategy (the oracle) on the same "
           "shape, timed side by side in one process; speed-ups are the baseline's time over autojac's. "
           f"{CHOICE_ALONE}", ""]
    if run.notes:
        out += ["Notes:", *[f"- {n}" for n in run.notes], ""]
    out += ["## Summary", "", *headline_table(run, run.summaries), "", "Targets:", "", *targets(run), ""]
    if run.dispatch_overhead_median is not None:
        out += [f"Dispatch overhead of a tuned call over the winning strategy called directly (median over "
                f"the cases faster than 2 ms): {run.dispatch_overhead_median * 1e6:.1f} us.", ""]
    for (suite, op), members in _by_group(run.cases).items():
        group = next(g for g in run.summaries if g.suite == suite and g.op == op)
        out += [f"## {suite}: {op}", "", *strategy_table(group), "", *case_table(members), ""]
    trouble = problems(run.cases)
    if trouble:
        out += ["## Skipped cases, timeouts, failures and disagreements", "", *trouble, ""]
    return "\n".join(out)


def readme_fragment(run: Run, plot: str | None) -> str:
    """The README section the runner keeps up to date (benchmarks/results/SUMMARY.md)."""
    command = f"{INSTALL} && {run.settings.command}"
    out = [f"Measured {run.created:%Y-%m-%d} on {run.machine.device_name} ({run.machine.threads} threads), "
           f"torch {run.machine.torch}; reproduce with:", "", "```bash", command, "```", "",
           *headline_table(run, [g for g in run.summaries if g.suite != ALL or g.op == ALL]), "", CHOICE_ALONE, ""]
    if run.notes:
        out += [*[f"- {n}" for n in run.notes], ""]
    out += ["Targets:", "", *targets(run), ""]
    if run.dispatch_overhead_median is not None:
        out += [f"A tuned call costs {run.dispatch_overhead_median * 1e6:.1f} us more than calling the "
                f"winning strategy directly (median).", ""]
    grid = next((g for g in run.summaries if g.suite == "design-grid" and g.op == "jacobian"), None)
    if grid is not None:
        out += ["On the 27-shape grid of docs/design.md, each fixed strategy against the fastest one per shape:", "",
                *strategy_table(grid), ""]
    if plot:
        out += [f"![speed-up over the tutorial recipe, autojac and the oracle]({plot})", ""]
    return "\n".join(out)


def plot(run: Run, path: Path) -> bool:
    """Bars of the speed-up over the tutorial baseline (vmap(jacrev) for the Jacobian), autojac's
    beside the oracle's, per case, one panel per suite and operation. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return False
    panels = []
    for (suite, op), members in _by_group(run.cases).items():
        shown = [c for c in members if c.status == "ok" and c.speedup_tutorial and c.regret]
        if shown:
            panels.append((suite, op, shown))
    if not panels:
        return False
    widest = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.32 * widest + 2), 3.6 * len(panels)), squeeze=False)
    for ax, (suite, op, shown) in zip(axes[:, 0], panels):
        xs = range(len(shown))
        ours = [c.speedup_tutorial for c in shown]
        oracle = [c.speedup_tutorial * c.regret for c in shown]  # tutorial / oracle
        ax.bar([i - 0.2 for i in xs], ours, width=0.4, label="autojac (tuned call)")
        ax.bar([i + 0.2 for i in xs], oracle, width=0.4, label="oracle (fastest fixed strategy)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        # labels at 1, 2 and 5 times each power of ten; the other minor ticks unlabelled
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([case_name(c) for c in shown], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel(f"speed-up over {shown[0].tutorial}")
        ax.set_title(f"{suite}: {op}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.machine.device_name}, {run.machine.threads} threads, torch {run.machine.torch}, "
                 f"{run.created:%Y-%m-%d}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
