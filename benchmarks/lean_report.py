"""The Markdown report and the console headline of a leanness run (benchmarks/leanness.py)."""

from __future__ import annotations

from collections.abc import Iterable


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _mark(ok: bool | None) -> str:
    return {True: "yes", False: "**MISSED**", None: "-"}[ok]


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def headline(record: dict) -> list[str]:
    """The targets of issue 12 and where this run stands: one line each."""
    s = record["summary"]
    lines = []
    if "twins" in s:
        t = s["twins"]
        lines.append(f"strategies vs twins: {t['pairs']} pairs, geomean {_x(t['geomean'])}x, worst {_x(t['worst'])}x, "
                     f"{t['misses']} over 1.05x and 5 us; no twin: {', '.join(t['no_twin']) or 'none'}"
                     + (f"; MISMATCH: {', '.join(t['mismatches'])}" if t["mismatches"] else ""))
    if "lean_oracle" in s:
        t = s["lean_oracle"]
        lines.append(f"autojac vs lean oracle: geomean {_x(t['geomean'])}x (target 1.10), worst {_x(t['worst'])}x "
                     f"(target 1.25): {_mark(t['meets'])}")
    if "own_oracle" in s:
        t = s["own_oracle"]
        lines.append(f"autojac vs its own strategies (design grid, {t['cases']} shapes): regret geomean "
                     f"{_x(t['geomean'])} (target 1.05), worst {_x(t['worst'])} (target 1.3): {_mark(t['meets'])}")
    if "dispatch" in s:
        t = s["dispatch"]
        lines.append(f"hot path: {_us(t['median_overhead_s'])} us median overhead, worst "
                     f"{_us(t['worst_overhead_s'])} us "
                     f"(target 5 us): {_mark(t['meets'])}")
    if "first_call" in s:
        t = s["first_call"]
        lines.append(f"first call (tuned call < 2 ms): {_x(t['warm_calls_geomean'])} tuned calls in a warm process, "
                     f"{_x(t['fresh_calls_geomean'])} in a fresh one (geomean; target max(100 ms, 50 calls)): "
                     f"warm {_mark(t['meets_warm'])}, fresh {_mark(t['meets_fresh'])}; torch.func's start-up alone "
                     f"{_ms(t.get('torch_func_startup_s'))} ms")
    if "new_batch" in s:
        t = s["new_batch"]
        lines.append(f"new batch size within 2x: worst {_x(t['within_2x_calls_worst'])} tuned calls (target 5): "
                     f"{_mark(t['within_2x_meets'])}; {t['retuned']} of {t['cases']} new sizes re-tuned")
    if "closures" in s:
        t = s["closures"]
        lines.append(f"closure constants and growing state: {t['retuned_later']} of {t['later_calls']} later calls "
                     f"re-tuned (target 0)")
    return lines


def markdown(record: dict) -> str:
    m, st = record["machine"], record["settings"]
    lines = [
        f"# Leanness of autojac ({st['mode']} run, {record['created'][:16].replace('T', ' ')} UTC)", "",
        f"{m['cpu']}, {m['threads']} torch threads of {m['cpu_count']} CPUs, torch {m['torch']}, Python {m['python']}, "
        f"autojac {m['autojac']} from `{m['autojac_source']}` (commit {m['autojac_commit']}), benchmark commit "
        f"{m['benchmark_commit']}; load average {m['load_average']} at the start, {record['load_average_end']} at "
        f"the end; {record['seconds']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in record.get("section_seconds", {}).items()) + ").", "",
        f"Command: `{record['command']}`. Settings: {', '.join(f'{k}={v}' for k, v in st.items())}.", "",
    ]
    lines += [f"- note: {note}" for note in record["notes"]] + ([""] if record["notes"] else [])
    lines += ["## Targets", ""] + [f"- {line}" for line in headline(record)] + [""]
    sec = record["sections"]
    if "twins" in sec:
        lines += _twins(sec["twins"], record["summary"].get("twins"))
    if "lean_oracle" in sec:
        lines += _lean(sec["lean_oracle"])
    if "own_oracle" in sec:
        lines += _own(sec["own_oracle"])
    if "dispatch" in sec:
        lines += _dispatch(sec["dispatch"])
    if "first_call" in sec:
        lines += _first(sec["first_call"], sec.get("startup") or [])
    if "new_batch" in sec:
        lines += _batch(sec["new_batch"])
    if "closures" in sec:
        lines += _closures(sec["closures"])
    return "\n".join(lines)


def _twins(rows: list[dict], summary: dict | None) -> list[str]:
    lines = ["## 1. Each strategy against its hand-written twin", "",
             "The strategy called directly (`strategy(Problem(...), chunk)`) and its twin (benchmarks/twins.py: the "
             "same method in plain torch, seeds and bases built once), timed side by side; their results agree. "
             "Target: ratio <= 1.05 or at most 5 us slower. 'Ratio' is of the medians; 'paired', the median ratio "
             "of calls made in the same interleaved round (load that drifts between rounds cancels): where the two "
             "differ much, the machine was too busy for that figure.", ""]
    timed = [r for r in rows if "ratio" in r]
    lines += _table(["op", "shape", "strategy", "strategy (us)", "twin (us)", "ratio", "paired", "within target"],
                    [(r["op"], r["shape"], f"`{r['label']}`", _us(r["strategy_s"]), _us(r["twin_s"]), _x(r["ratio"]),
                      _x(r.get("paired_ratio")), _mark(r["meets"]) + (" (one call)" if r.get("single") else ""))
                     for r in timed])
    if summary:
        lines += ["Per strategy, over the shapes:", ""]
        lines += _table(["strategy", "pairs", "geomean ratio", "worst ratio"],
                        [(f"`{name}`", s["pairs"], _x(s["geomean"]), _x(s["worst"]))
                         for name, s in sorted(summary["per_strategy"].items(), key=lambda kv: -kv[1]["geomean"])])
    others = [r for r in rows if "ratio" not in r]
    if others:
        grouped: dict[tuple[str, str], list[str]] = {}
        for r in others:
            why = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
            if "strategy_s" in r:
                why += f" (strategy alone {_us(r['strategy_s'])} us at {r['op']} {r['shape']})"
                grouped.setdefault((r["label"], why), []).append("")
            else:
                grouped.setdefault((r["label"], why), []).append(f"{r['op']} {r['shape']}")
        lines += ["Not compared:", ""]
        for (label, why), where in grouped.items():
            places = [w for w in where if w]
            lines.append(f"- `{label}`: {why}" + (f" [{'; '.join(places)}]" if places else ""))
        lines.append("")
    return lines


def _lean(rows: list[dict]) -> list[str]:
    lines = ["## 2. autojac against the lean oracle", "",
             "autojac's tuned public call against the fastest hand-written twin of any strategy on that shape (the "
             "fastest twins of section 1, timed again side by side with autojac), and against the fastest of the "
             "strategies section 1 found fastest (and autojac's choice) called directly. Targets: lean oracle 1.10 "
             "geomean, 1.25 worst.", ""]
    ok = [r for r in rows if r["status"] == "ok"]
    lines += _table(["op", "shape", "autojac (us)", "chosen", "lean oracle", "its time (us)", "ratio", "paired",
                     "fastest strategy", "regret", "tuning (s)"],
                    [(r["op"], r["shape"], _us(r["autojac_s"]), f"`{r['chosen']}`", f"twin of `{r['lean_oracle']}`",
                      _us(r["lean_oracle_s"]), _x(r["lean_ratio"]), _x(r.get("lean_paired")), f"`{r['own_oracle']}`",
                      _x(r["own_regret"]), f"{r['tuning_s']:.2f}") for r in ok])
    lines += [f"- {r['op']} {r['shape']}: {r['status']}: {r.get('reason', '')}" for r in rows if r["status"] != "ok"]
    return lines


def _own(rows: list[dict]) -> list[str]:
    lines = ["### autojac against its own strategies, docs/design.md's grid", "",
             "MLP n -> 64 -> 64 -> m (tanh), the Jacobian: autojac's tuned call against each candidate the planner "
             "weighed, called directly (after screening: one call each; those over 2x the fastest, or that the tuner "
             "timed at over 3x its fastest, are left out). 'Choice alone': the chosen strategy called directly over "
             "the fastest. Targets: 1.05 geomean, 1.3 worst.", ""]
    lines += _table(["shape", "autojac (us)", "chosen", "fastest", "its time (us)", "regret", "paired", "choice alone",
                     "tuning (s)"],
                    [(r["shape"], _us(r["autojac_s"]), f"`{r['chosen']}`", f"`{r['own_oracle']}`",
                      _us(r["own_oracle_s"]), _x(r["regret"]), _x(r.get("regret_paired")), _x(r["choice_alone"]),
                      f"{r['tuning_s']:.2f}")
                     for r in rows if r["status"] == "ok"])
    lines += [f"- {r['shape']}: {r['status']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    return lines


def _dispatch(rows: list[dict]) -> list[str]:
    lines = ["## 3. Hot path", "",
             "A tuned `autojac.<op>(f, x)` against the chosen strategy called directly, interleaved; the overhead is "
             "the median over rounds of the difference of the rounds' medians ('paired': the median difference of "
             "calls made in the same round). Target: <= 5 us.", ""]
    lines += _table(["op", "shape", "chosen", "autojac (us)", "directly (us)", "overhead (us)", "paired (us)",
                     "rounds", "within target"],
                    [(r["op"], r["shape"], f"`{r['chosen']}`", _us(r["autojac_s"]), _us(r["direct_s"]),
                      _us(r["overhead_s"]), _us(r.get("overhead_paired_s")), len(r["rounds"]), _mark(r["meets"]))
                     for r in rows])
    return lines


def _first(rows: list[dict], startup: list[dict]) -> list[str]:
    lines = ["## 4. First call, in tuned calls", "",
             "The first call of a problem with no plan (tuning included) over a tuned call's time: in a fresh process "
             "(torch.func's one-time start-up counts; median over processes) and as a new problem in a warm process. "
             "Target, for tuned calls under 2 ms: at most max(100 ms, 50 tuned calls).", ""]
    lines += _table(["op", "shape", "chosen", "tuned call (us)", "warm process (ms)", "in calls", "fresh process (ms)",
                     "in calls", "target (ms)", "within target (warm, fresh)"],
                    [(r["op"], r["shape"], f"`{r['chosen']}`", _us(r["tuned_s"]), _ms(r["warm_first_s"]),
                      f"{r['warm_calls']:.0f}", _ms(r.get("fresh_first_s")),
                      f"{r['fresh_calls']:.0f}" if "fresh_calls" in r else r.get("fresh_error", "-"),
                      _ms(r["target_s"]),
                      f"{_mark(r['meets_warm'])}, {_mark(r['meets_fresh'])}" if r["applies"] else "over 2 ms: -")
                     for r in rows])
    for r in startup:
        lines += [f"torch.func's one-time start-up alone (a first vjp, vmap and jvp of torch.sin in a new process, "
                  f"nothing of autojac): {_ms(r['startup_s'])} ms (median of {len(r['runs'])}); the fresh process's "
                  f"first call pays it.", ""]
    return lines


def _batch(rows: list[dict]) -> list[str]:
    lines = ["## 5. A new batch size", "",
             "Tuned at B, then the first call at a new B' (its cost in tuned calls at B'). Target within 2x: at most "
             "5 calls, no timing.", ""]
    lines += _table(["op", "shape (tuned at)", "new B", "within 2x", "first call (ms)", "tuned call (us)", "in calls",
                     "tunings", "plan at new B", "within target"],
                    [(r["op"], r["shape"], r["batch"], "yes" if r["within_2x"] else "no", _ms(r["first_s"]),
                      _us(r["tuned_s"]), f"{r['calls']:.0f}", r["tunings"],
                      f"`{r['plan']['label']}` (B={r['plan']['batch_size']})", _mark(r["meets"])) for r in rows])
    return lines


def _closures(rows: list[dict]) -> list[str]:
    lines = ["## 6. Closure constants and growing state", "",
             "Each later call is a new closure (a new t) or a call after the training step appended a loss: its "
             "cost in tuned calls, and whether it tuned again. Target: no new tuning.", ""]
    for r in rows:
        lines.append(f"**{r['case']}** ({r['problem']}, tuned call {_us(r['tuned_s'])} us, "
                     f"{r['plans_total']} plans stored):")
        lines.append("")
        lines += _table(["call", "time (ms)", "in tuned calls", "tunings", "plans added"],
                        [(f"t={s['t']}" if "t" in s else f"step {s['step']} ({s['losses']} losses kept)",
                          _ms(s["first_s"]), f"{s['calls']:.0f}", s["tunings"], s["plans_added"]) for s in r["steps"]])
    return lines
