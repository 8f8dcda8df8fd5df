"""The benchmark runner (benchmarks/): its quick mode end to end on the tiny suite, second-order
operations picked up from the registry, the baselines against explicit per-sample loops, the
peak-memory subprocess, the time cap, and the aggregates."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.func import hessian, vmap

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

import autojac  # noqa: E402
from autojac.api import _run  # noqa: E402
from autojac.probes import run_probes  # noqa: E402
from autojac.strategies import registry  # noqa: E402
from autojac.strategies.basis import one_sample  # noqa: E402
from autojac.strategies.registry import BATCH_INDEPENDENT, VMAP, Strategy  # noqa: E402
from benchmarks import baselines, report, run  # noqa: E402
from benchmarks.deadline import Overtime, deadline  # noqa: E402
from benchmarks.peak import peak_rss  # noqa: E402
from benchmarks.schema import TIMED, CaseResult, Run  # noqa: E402
from benchmarks.workloads import Case, catalog  # noqa: E402

from helpers import assert_close, loop_jacobian  # noqa: E402

FAST = ["--quick", "--suite", "tiny", "--min-time", "0.005", "--tune-budget", "0.1"]


def _load(out: Path) -> Run:
    (path,) = out.glob("*.json")
    return Run.model_validate_json(path.read_text())


def _check_complete(result: Run, op: str) -> list[CaseResult]:
    """Every case of `op` measured, every registered strategy either excluded or timed."""
    cases = [c for c in result.cases if c.op == op]
    assert cases
    for case in cases:
        assert case.status == "ok", case.reason
        by_label = {m.label: m for m in case.measurements}
        names = {m.label.split("[")[0] for m in case.measurements if m.kind == "fixed"}
        assert names == set(registry.names(op))
        for m in case.measurements:
            if m.status in ("excluded", "skipped"):
                assert m.reason
                continue
            assert m.status in TIMED and m.median > 0 and m.repeats >= 1, m
            assert m.agrees is True, m
        assert by_label["autojac"].median == case.autojac > 0
        assert case.chosen in by_label and case.oracle in by_label
        assert case.regret == pytest.approx(case.autojac / by_label[case.oracle].median)
        assert case.speedup_tutorial == pytest.approx(by_label[case.tutorial].median / case.autojac)
        assert case.tuning_seconds > 0
    return cases


def test_quick_mode_writes_valid_results(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("AUTOJAC_TUNE", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", *FAST, "--ops", "jacobian", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = _load(tmp_path)
    assert result.settings.mode == "custom" and result.settings.suites == ["tiny"]
    assert result.machine.threads >= 1 and result.machine.matmul_flops["float32"] > 0
    assert result.machine.torch == torch.__version__
    cases = _check_complete(result, "jacobian")
    assert {c.tutorial for c in cases} == {"vmap(jacrev)"}
    assert all(c.full and c.full.startswith("full-Jacobian diagonal") and c.speedup_full for c in cases)
    assert any(c.dispatch is not None for c in cases)
    assert all(c.flops and c.achieved_flops > 0 for c in cases)
    stem = next(tmp_path.glob("*.json")).stem
    assert stem.startswith(f"{result.machine.slug}-{result.created:%Y-%m-%d}")
    assert "| tiny | jacobian |" in (tmp_path / f"{stem}.md").read_text()
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / f"{stem}.png").exists() == has_matplotlib
    assert not (tmp_path / "SUMMARY.md").exists()  # only a full run (or --summary) writes it


def _loop_hessian(p, chunk):
    # An independent reference, as a strategy: one torch.autograd.functional.hessian per sample and output.
    f_one = one_sample(p.f)
    rows = []
    for xi in p.x:
        out = f_one(xi)
        parts = [torch.autograd.functional.hessian(lambda z, k=k: f_one(z).reshape(-1)[k], xi)
                 for k in range(out.numel())]
        rows.append(torch.stack(parts).reshape(*out.shape, *xi.shape, *xi.shape))
    return torch.stack(rows)


def test_second_order_operations_are_picked_up_once_registered(tmp_path, monkeypatch):
    with registry.temporary() as reg:
        reg.add(Strategy(name="test_loop_hessian", ops=frozenset({"hessian"}), run=_loop_hessian,
                         memory=lambda s, c: 0, needs=frozenset({BATCH_INDEPENDENT})))
        reg.add(Strategy(name="test_vmap_hessian", ops=frozenset({"hessian"}),
                         run=lambda p, c: vmap(hessian(one_sample(p.f)))(p.x), memory=lambda s, c: 0,
                         needs=frozenset({BATCH_INDEPENDENT, VMAP})))
        monkeypatch.setattr(autojac, "hessian", lambda f, x, **kw: _run("hessian", f, x, None, (), None, False, None,
                                                                      "auto", False, None, None), raising=False)
        assert run.main([*FAST, "--ops", "hessian", "--out", str(tmp_path), "--no-plot"]) == 0
        result = _load(tmp_path)
        assert result.settings.ops == ["hessian"]
        cases = _check_complete(result, "hessian")
    assert {c.tutorial for c in cases} == {"vmap(hessian)"}
    assert all(c.speedup_tutorial for c in cases)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("workload", ["tiny-mlp-3-8-2", "tiny-mlp-2-8-s"])
def test_baselines_match_per_sample_loops(workload, dtype):
    case = Case("test", catalog()[workload], "jacobian", 3, str(dtype).split(".")[-1])
    f, x, _ = case.make()
    v = torch.randn_like(x)
    probes = run_probes(f, x)
    jac = loop_jacobian(f, x)  # (B, *out, *in)
    rows = []
    for xi in x:
        out = one_sample(f)(xi)
        rows.append(torch.stack([torch.autograd.functional.hessian(lambda z, k=k: one_sample(f)(z).reshape(-1)[k], xi)
                                 for k in range(out.numel())]).reshape(*out.shape, *xi.shape, *xi.shape))
    hess = torch.stack(rows)  # (B, *out, *in, *in)
    diag = hess.diagonal(dim1=-2, dim2=-1)
    expected = {"jacobian": jac, "hessian": hess, "hvp": (hess * v.view(3, *[1] * (hess.dim() - 3), 1, -1)).sum(-1),
                "hessian_diag": diag, "laplacian": diag.sum(-1)}
    for op, reference in expected.items():
        found = baselines.for_op(op, f, x, v, probes)
        assert found and all(b.run is not None for b in found), found
        for b in found:
            assert_close(b.run(), reference)


def test_peak_memory_subprocess_sees_the_result():
    spec = dict(workload="decoder-8-784", op="jacobian", batch=512, dtype="float32", label="sum_fwd", kind="fixed",
                threads=1)
    peak, note = peak_rss(spec, timeout=120)
    result_bytes = 512 * 784 * 8 * 4
    assert peak is not None, note
    assert result_bytes <= peak < 100 * result_bytes


def test_deadline_stops_a_python_loop_and_is_not_an_exception():
    started = time.perf_counter()
    with pytest.raises(Overtime):
        with deadline(0.2):
            try:
                while True:
                    time.sleep(0.01)
            except Exception:  # what autojac's tuner does with a failing candidate: must not swallow it
                pytest.fail("Overtime was caught as an Exception")
    assert time.perf_counter() - started < 2
    with deadline(0.2):
        pass
    time.sleep(0.3)  # the timer was cancelled on exit: nothing fires now


def _case(workload: str, regret: float, speedup: float, times: dict[str, float]) -> CaseResult:
    from benchmarks.schema import Measurement

    oracle = min(times, key=times.get)
    measurements = [Measurement(label=k, kind="fixed", status="ok", median=v, repeats=5, agrees=True)
                    for k, v in times.items()]
    return CaseResult(suite="s", workload=workload, title="", op="jacobian", batch=1, in_shape=[2], dtype="float32",
                      status="ok", measurements=measurements, oracle=oracle, oracle_time=times[oracle],
                      regret=regret, speedup_tutorial=speedup, autojac=regret * times[oracle], tuning_seconds=1.0)


def test_summaries_aggregate_regret_wins_and_slowdowns():
    cases = [_case("a", 1.0, 2.0, {"sum_rev": 1.0, "sum_fwd": 4.0, "sum_fwd[chunk=16]": 2.0}),
             _case("b", 1.21, 8.0, {"sum_rev": 3.0, "sum_fwd": 1.0})]
    group = report.summarize(cases, "s", "jacobian")
    assert group.regret_geomean == pytest.approx(1.1)
    assert group.regret_worst == pytest.approx(1.21) and group.regret_worst_case == "b B=1"
    assert group.within_110 == 0.5
    assert group.speedup_tutorial_geomean == pytest.approx(4.0)
    assert group.wins == {"sum_rev": 1, "sum_fwd": 1}
    # sum_fwd's best chunk counts: 2.0/1.0 on a, 1.0/1.0 on b.
    assert group.slowdown_geomean["sum_fwd"] == pytest.approx(math.sqrt(2.0))
    assert group.slowdown_worst["sum_rev"] == pytest.approx(3.0)
    assert {(g.suite, g.op) for g in report.summaries(cases)} == {("s", "jacobian"), ("all", "jacobian"), ("all", "all")}


@pytest.mark.parametrize("create_graph", [False, True])
def test_second_order_script_times_every_candidate_and_reports(create_graph):
    from benchmarks import second_order

    row = second_order.measure("laplacian", 4, 2, 1, create_graph, min_time=0.002)
    times = row["times"]
    assert {"autojac", "vmap(hessian)", row["plan"]} <= set(times)
    assert all(t > 0 for t in times.values()) and row["tuning_seconds"] > 0
    assert "jet_laplacian" in times  # the engine applies to the tanh MLP
    text = "\n".join(second_order.report([row]))
    assert "over 1 shapes" in text and row["plan"] in text


def test_merge_joins_suites_run_one_at_a_time(tmp_path):
    assert run.main([*FAST, "--ops", "hessian", "--out", str(tmp_path / "a"), "--no-plot"]) == 0
    tiny = _load(tmp_path / "a")

    def as_suite(name: str, **settings) -> Run:
        cases = [c.model_copy(update={"suite": name}) for c in tiny.cases]
        return tiny.model_copy(update={"cases": cases, "settings": tiny.settings.model_copy(
            update={"suites": [name], **settings})})

    full = dict(run.MODES["full"], tune_budget=tiny.settings.tune_budget)
    parts = [as_suite(name, **full) for name in ("design-grid", "second-order", "workloads")]
    merged = run.merge(parts)
    assert merged.settings.mode == "full" and merged.settings.suites == ["design-grid", "second-order", "workloads"]
    assert len(merged.cases) == 3 * len(tiny.cases)
    assert {(g.suite, g.op) for g in merged.summaries} >= {("second-order", "hessian"), ("all", "all")}
    overall = next(g for g in merged.summaries if g.suite == "all" and g.op == "all")
    assert overall.cases == len(merged.cases)
    assert run.merge(parts[:2]).settings.mode == "custom"  # not every suite of a full run

    other_ops = run.merge([tiny, as_suite("quick", ops=["jacobian"])])  # each case names its own op
    assert other_ops.settings.ops == ["hessian", "jacobian"] and other_ops.settings.mode == "custom"
    with pytest.raises(ValueError, match="suite tiny appears in two runs"):
        run.merge([tiny, tiny])
    with pytest.raises(ValueError, match=r"different settings \(min_time\)"):
        run.merge([tiny, as_suite("quick", min_time=1.0)])
    other_machine = as_suite("quick").model_copy(update={"machine": tiny.machine.model_copy(update={"threads": 7})})
    with pytest.raises(ValueError, match=r"threads is \d+ in one, 7 in another"):
        run.merge([tiny, other_machine])

    # load notes are judged again by the current rule: a run's own threads do not make it busy
    stale = "the machine was busy when the run ended (load average 1.9 on 2 CPUs): ..."
    quiet = tiny.machine.model_copy(update={"cpu_count": 2, "threads": 2, "load_average": [0.3, 0.3, 0.3]})
    busy_end = [as_suite(name, **full).model_copy(update={"machine": quiet, "notes": [stale, "kept"],
                                                           "load_average_end": [load, 1.0, 1.0]})
                for name, load in (("design-grid", 1.9), ("second-order", 3.6))]
    notes = run.merge(busy_end).notes
    assert stale not in notes and "kept" in notes
    assert notes[1:] == ["the machine was busy when the run ended (load average 3.6 on 2 CPUs, 2 of it this "
                         "run's): other processes competed for the cores, so these timings are unreliable; "
                         "rerun on a quiet machine"]
    # a suite started right after another inherits its load in the 1-minute average: not busy
    first = busy_end[0].model_copy(update={"load_average_end": [1.9, 1.0, 1.0], "seconds": 60.0})
    after = dict(machine=quiet.model_copy(update={"load_average": [1.8, 1.0, 1.0]}), load_average_end=[1.9, 1.0, 1.0])
    follows = busy_end[1].model_copy(update=dict(after, created=first.created + timedelta(seconds=61)))
    later = busy_end[1].model_copy(update=dict(after, created=first.created + timedelta(hours=1)))
    assert run.merge([first, follows]).notes == ["kept"]
    assert any("busy when the run started (load average 1.8" in n for n in run.merge([first, later]).notes)

    (tmp_path / "b.json").write_text(parts[0].model_dump_json())
    (tmp_path / "c.json").write_text(parts[1].model_dump_json())
    (tmp_path / "d.json").write_text(parts[2].model_dump_json())
    out = tmp_path / "merged"
    assert run.main(["--merge", *(str(tmp_path / f"{n}.json") for n in "bcd"), "--out", str(out), "--no-plot"]) == 0
    assert (out / "SUMMARY.md").exists()
    (written,) = out.glob("*-full.json")
    assert Run.model_validate_json(written.read_text()).cases == merged.cases


def test_settings_follow_the_mode_and_the_flags(monkeypatch):
    monkeypatch.setenv("AUTOJAC_TUNE_BUDGET", "1.0")  # _settings exports the quick mode's budget; undone after

    def settings(*argv):
        args = run.build_parser().parse_args(list(argv))
        return run._settings(args, list(argv), ["jacobian"])

    full = settings()
    assert full.mode == "full" and full.coupled_only and full.memory == "key" and full.min_repeats == 7
    trimmed = settings("--memory", "none", "--no-coupled-only")
    assert trimmed.mode == "full" and not trimmed.coupled_only and trimmed.memory == "none"
    assert trimmed.command == "python -m benchmarks.run --memory none --no-coupled-only"
    quick = settings("--quick")
    assert quick.mode == "quick" and not quick.coupled_only and quick.chunks == "unchunked"
    assert settings("--suite", "tiny").mode == "custom"


def test_strategies_kept_for_coupled_f_are_timed_on_independent_f_in_chunks_only():
    from benchmarks import measure
    from autojac.problem import Problem

    settings = run._settings(run.build_parser().parse_args([]), [], ["jacobian"])
    assert settings.coupled_only
    f, x, _ = Case("design-grid", catalog()["mlp-2-64-64-64"], "jacobian", 32).make()
    fixed, left_out = measure.fixed_contenders("jacobian", Problem("jacobian", f, x), run_probes(f, x),
                                               settings, None)
    timed = {c.label for c in fixed}
    assert {"full_diag[chunk=64]", "full_diag[chunk=16]", "full_diag[chunk=1]"} <= timed
    assert "full_diag" not in timed  # its one vectorized call could not be stopped by the time cap
    assert {m.label: m.reason for m in left_out}["full_diag"] == measure.UNCHUNKED_EXTRA


def test_vmap_hessian_baseline_is_not_attempted_when_its_working_memory_is_over_the_budget(monkeypatch):
    # vmap(hessian) is vmap_fwd_rev whole: n m lanes of f's activations. On a decoder 8 -> 784 at
    # B=512 it allocates over 10 GB in one tensor (the benchmark process was killed); its result
    # alone is 100 MB, which is all the old guard counted.
    from benchmarks.workloads import catalog

    monkeypatch.setattr(baselines, "budget_bytes", lambda device: 4 * 2**30)
    f = catalog()["decoder-8-784"].build()
    for batch, attempted in ((32, True), (512, False)):
        x = torch.randn(batch, 8)
        (found,) = baselines.for_op("hessian", f, x, None, run_probes(f, x))
        assert (found.run is not None) == attempted
    assert "vmap(hessian) needs about" in found.reason and "over the memory budget of 4.0 GiB" in found.reason


def test_a_run_stopped_midway_keeps_the_cases_it_measured(tmp_path, monkeypatch):
    measured = []

    def measure_until_killed(case, *args):
        if len(measured) == 2:
            raise KeyboardInterrupt  # as far as the run can tell, the process stops here
        measured.append(real(case, *args))
        return measured[-1]

    real = run.measure_case
    monkeypatch.setattr(run, "measure_case", measure_until_killed)
    with pytest.raises(KeyboardInterrupt):
        run.main([*FAST, "--ops", "jacobian", "--ops", "hessian", "--out", str(tmp_path), "--no-plot"])
    (partial,) = tmp_path.glob("*.partial.json")
    kept = Run.model_validate_json(partial.read_text())
    assert [c.workload for c in kept.cases] == [c.workload for c in measured]
    assert any(note.startswith("partial: the run stopped after 2 of") for note in kept.notes)
    assert run.merge([kept]).cases == kept.cases  # joinable like any run

    monkeypatch.setattr(run, "measure_case", real)
    assert run.main([*FAST, "--ops", "jacobian", "--ops", "hessian", "--out", str(tmp_path), "--no-plot"]) == 0
    assert not list(tmp_path.glob("*.partial.json"))  # a finished run leaves its full files only


# -- the benchmark of leanness (benchmarks/leanness.py, benchmarks/twins.py) --------------------

from benchmarks import lean_api, leanness, twins  # noqa: E402

LEAN_SHAPES = (leanness.Shape(4, 3, None, (8,)), leanness.Shape(3, 2, 3, (8,)))  # a scalar and a vector output


@pytest.mark.parametrize("strategy", list(registry.all_strategies()), ids=lambda s: s.name)
def test_each_twin_computes_what_its_strategy_computes(strategy):
    """Every registered strategy's hand-written twin agrees with it at every chunk it offers (and
    at chunk 2, a short last span); a strategy without a twin is reported, never a crash."""
    compared = skipped = 0
    for op in sorted(strategy.ops):
        for shape in leanness.shapes_for(op, leanness.Suite(LEAN_SHAPES, LEAN_SHAPES, (), (), (), (), LEAN_SHAPES[0], ())):
            f, x, v = shape.make("float64", op)
            if lean_api.not_applicable(strategy, op, f, x, v):
                continue
            out_shape = lean_api.tensor_out_shape(f, x)
            chunks = set(lean_api.chunk_options(strategy, x, out_shape)) | ({2} if strategy.basis else set())
            for chunk in sorted(chunks, key=lambda c: (c is not None, c or 0)):
                spec = twins.Spec(op, f, x, v, chunk, out_shape)
                if strategy.name not in twins.TWINS:
                    with pytest.raises(twins.NoTwin, match="no twin"):
                        twins.make(strategy.name, spec)
                    return
                try:
                    made = twins.make(strategy.name, spec)
                except twins.NoTwin:  # a twin written for some models only (a plain nn.Sequential)
                    skipped += 1
                    continue
                expected = strategy(lean_api.problem(op, f, x, v), chunk)
                got = made()
                for a, b in zip(*((got, expected) if isinstance(got, tuple) else ((got,), (expected,)))):
                    assert_close(a, b)
                compared += 1
    assert compared > 0 or skipped > 0


def test_leanness_quick_run_on_tiny_shapes(tmp_path, monkeypatch, capsys):
    """The benchmark runs every section but the fresh-process one on tiny shapes (that one's child
    runs in this process), writes its JSON and report, lists a strategy without a twin as such,
    and its twins agree with the strategies."""
    monkeypatch.setenv("AUTOJAC_TUNE_BUDGET", "0.05")
    tiny = leanness.Shape(4, 3, 2, (8,))
    suite = leanness.Suite(first_order=(tiny,), second_order=LEAN_SHAPES[1:], grid=(("mlp-2-64-64-1", 1),),
                           dispatch=(("jacobian", tiny),), first_call=(), new_batch=(("jacobian", tiny, (6,)),),
                           ode=leanness.Shape(4, 2, 2, (8,)), closures=("functools.partial(f, t)",), times=(0.0, 0.5))
    fast = dict(min_time=0.002, min_repeats=2, dispatch_rounds=2, dispatch_time=0.002)
    settings = leanness.Settings(**{**leanness.MODES["quick"], **fast}, mode="quick", dtype="float64",
                                 threads=torch.get_num_threads(), tune_budget=0.05, sections=(1, 2, 3, 5, 6), only=())

    def per_sample_jacobian(p, chunk):
        return vmap(torch.func.jacrev(one_sample(p.f)))(p.x)

    with registry.temporary() as added:
        added.add(Strategy(name="bench_untwinned", ops=frozenset({"jacobian"}), run=per_sample_jacobian,
                           memory=lambda s, c: 0, needs=frozenset({BATCH_INDEPENDENT, VMAP})))
        record = leanness.run(settings, "test", suite)
        names = {op: set(registry.names(op)) for op in lean_api.operations()}
    paths = leanness.write(record, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md"] and all(p.stat().st_size for p in paths)
    assert json.loads(paths[0].read_text())["schema"] == leanness.SCHEMA
    rows = record["sections"]["twins"]
    untwinned = [r for r in rows if r["strategy"] == "bench_untwinned"]
    assert untwinned and all(r["status"] == "no twin" and r["strategy_s"] > 0 for r in untwinned)
    for op in names:
        assert {r["strategy"] for r in rows if r["op"] == op} == names[op]
    assert not [r for r in rows if r["status"] in ("mismatch", "error", "twin error")]
    compared = [r for r in rows if "ratio" in r]
    assert compared and all(r["twin_s"] > 0 and r["ratio"] == r["strategy_s"] / r["twin_s"] for r in compared)
    assert {r["op"] for r in compared} == set(lean_api.operations())
    oracle = record["sections"]["lean_oracle"]
    assert oracle and all(r["status"] == "ok" and r["lean_ratio"] > 0 for r in oracle)
    assert record["sections"]["own_oracle"][0]["regret"] > 0
    assert record["sections"]["dispatch"][0]["autojac_s"] > 0
    batch = record["sections"]["new_batch"][0]
    assert batch["batch"] == 6 and batch["within_2x"] and batch["first_s"] > 0
    closure, growing = record["sections"]["closures"]
    assert len(closure["steps"]) == len(growing["steps"]) == 2
    assert closure["steps"][0]["tunings"] == 1  # the first call of a new problem tunes, and is seen tuning
    summary = record["summary"]
    assert "bench_untwinned" in summary["twins"]["no_twin"] and summary["lean_oracle"]["cases"] == len(oracle)
    report = paths[1].read_text()
    assert "## 1. Each strategy against its hand-written twin" in report and "bench_untwinned" in report

    spec = json.dumps(dict(what="first call", op="jacobian", shape=dataclasses.asdict(tiny),
                           settings=dataclasses.asdict(settings)))
    capsys.readouterr()
    assert leanness.main(["--child", spec]) == 0
    child = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert child["first_s"] > 0 and child["tuned_s"] > 0 and child["tunings"] == 1


def test_results_go_outside_the_source_tree_unless_published(tmp_path):
    parser = run.build_parser()
    default = run.output_dir(parser.parse_args(["--quick"]))
    assert default == run.default_out() and ROOT not in default.resolve().parents
    assert run.output_dir(parser.parse_args(["--quick", "--out", str(tmp_path)])) == tmp_path
    assert run.output_dir(parser.parse_args(["--publish"])) == run.RESULTS == ROOT / "benchmarks" / "results"
    assert run.output_dir(parser.parse_args(["--publish", "--out", str(run.RESULTS)])) == run.RESULTS
    with pytest.raises(SystemExit, match="--publish writes into"):
        run.output_dir(parser.parse_args(["--publish", "--out", str(tmp_path)]))


def test_a_run_without_out_writes_into_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "default_out", lambda: tmp_path / "default")
    before = {path: path.stat().st_mtime_ns for path in run.RESULTS.rglob("*")}
    assert run.main([*FAST, "--ops", "jacobian", "--only", "tiny-mlp-3-8-2", "--no-plot"]) == 0
    assert _load(tmp_path / "default").settings.suites == ["tiny"]
    assert {path: path.stat().st_mtime_ns for path in run.RESULTS.rglob("*")} == before  # published: untouched


def test_the_pinn_benchmark_times_the_engine_against_nested_autograd(tmp_path):
    from benchmarks import pinn

    assert pinn.chain_flops([512, 64, 64, 512]) == 2 * (512 * 64 * 64 + 512 * 64 * 512)
    assert pinn.chain_flops([2, 100, 3]) == 2 * 2 * 100 * 3
    from autojac.problem import Problem

    get = registry.get
    case = pinn.run_pinn_case("space_time", 2, 16, "laplacian", True, min_time=0.001)
    assert set(case["seconds"]) == {"nested", "autojac", *pinn.ENGINE}
    assert case["max_abs_difference"] < 1e-4 and case["engine_speedup"] > 0
    torch.manual_seed(0)
    for name, model in pinn.MODELS.items():  # every model's Laplacian: the engine's equals nested autograd
        f, x = model(3), torch.rand(5, 3)
        engine = get("jet_laplacian")(Problem("laplacian", f, x))
        torch.testing.assert_close(engine, pinn.nested("laplacian", f, x, False).detach(), rtol=1e-3, atol=1e-3)
    grid = pinn.run_grid_case(2, 3, 4, min_time=0.001)
    assert grid["engine_speedup"] > 0 and "vmap(jacrev)" in grid["seconds"]
    result = {"meta": {"date": "d", "machine": "m", "torch": "t", "threads": 1, "load_before": [], "load_after": []},
              "pinn": [case], "grid": [grid], "overhead": pinn.interpretation_overhead(0.001)}
    text = pinn.markdown(result)
    assert "space_time" in text and "27-shape grid" in text and "per operation" in text
