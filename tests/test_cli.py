"""Every command of `autojac`, its output and its exit code, including bad arguments."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import autojac
from autojac import cli, demo
from autojac.cache import read_plan_file, schema_text

ROOT = Path(__file__).resolve().parent.parent

MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, n_in=5, n_out=3):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def make():
    return Net()


def f(x):
    return torch.sin(x) * x.sum(-1, keepdim=True)


model = Net()
not_callable = 42


def needs(width):
    return Net(width)


def makes_a_number():
    return 3
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A module `cli_models` that MODULE:ATTR targets can name."""
    (tmp_path / "cli_models.py").write_text(MODELS)
    (tmp_path / "cli_broken.py").write_text("raise RuntimeError('this module fails on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("cli_models", "cli_broken"):
        sys.modules.pop(name, None)


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `autojac ARGV`, run in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse: usage errors and --help
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_path_prints_the_cache_file(capsys):
    assert run(capsys, "path") == (0, f"{autojac.cache_path()}\n", "")


def test_schema_prints_or_writes_the_plan_file_schema(capsys, tmp_path):
    code, out, _ = run(capsys, "schema")
    assert code == 0 and out == schema_text()
    code, out, _ = run(capsys, "schema", "-o", str(tmp_path / "schema.json"))
    assert code == 0 and (tmp_path / "schema.json").read_text() == schema_text()


@pytest.mark.parametrize("target", ["cli_models:make", "cli_models:Net", "cli_models:model", "cli_models:f"])
def test_warm_tunes_each_shape_with_a_progress_line(capsys, models, target):
    code, out, err = run(capsys, "warm", target, "--input-shape", "4,5", "--input-shape", "7,5")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("[1/2] jacobian of ") and "B=4 in=(5,) float32 cpu" in lines[0]
    assert lines[1].startswith("[2/2] jacobian of ") and "B=7" in lines[1] and "tuned in" in lines[1]
    assert lines[2] == f"2 plans in {autojac.cache_path()}"
    plans = autojac.plans()
    assert sorted(p.batch_size for p in plans) == [4, 7] and all(p.tuned for p in plans)

    code, out, _ = run(capsys, "warm", target, "--input-shape", "4,5")
    assert code == 0 and "stored already (tuned" in out  # not tuned twice


def test_warm_with_dtype_moves_a_module_and_plans_for_it(capsys, models):
    code, out, err = run(capsys, "warm", "cli_models:make", "--input-shape", "3,5", "--dtype", "float64", "--eval")
    assert code == 0, err
    (plan,) = autojac.plans()
    assert plan.dtype == "float64" and "float64" in out


def test_plans_shows_a_table_and_json(capsys, models):
    run(capsys, "warm", "cli_models:make", "--input-shape", "4,5")
    code, out, _ = run(capsys, "plans")
    (plan,) = autojac.plans()
    header, row, total = out.splitlines()
    assert code == 0 and header.split()[:3] == ["KEY", "OP", "FUNCTION"]
    assert row.split()[:4] == [plan.key[:10], "jacobian", "Net", "4"] and plan.label in row
    assert total.startswith("1 plan (cache: ")

    code, out, _ = run(capsys, "plans", "--json")
    assert code == 0 and [autojac.Plan.model_validate(p) for p in json.loads(out)] == [plan]
    assert json.loads(run(capsys, "plans", "--json", "--op", "hessian")[1]) == []
    assert json.loads(run(capsys, "plans", "--json", "--device", "cpu")[1]) == [plan.model_dump(mode="json")]
    autojac.clear_cache()
    assert run(capsys, "plans")[1].startswith("no plans")


def test_explain_a_callable_or_a_stored_key(capsys, models):
    code, out, err = run(capsys, "explain", "cli_models:make", "--input-shape", "4,5")
    (plan,) = autojac.plans()
    assert code == 0, err
    assert out.startswith(plan.summary()) and f"key {plan.key}" in out

    code, out, _ = run(capsys, "explain", plan.key[:6])
    assert code == 0 and out.startswith(plan.summary()) and "of tuning" in out

    code, out, err = run(capsys, "explain", "0123456789")
    assert code == 1 and out == "" and "no stored plan has a key starting with '0123456789'" in err


def test_export_clear_import_round_trip(capsys, models, tmp_path):
    run(capsys, "warm", "cli_models:make", "--input-shape", "4,5", "--input-shape", "6,5")
    before = autojac.plans()
    path = tmp_path / "shipped.json"

    assert run(capsys, "export", str(path)) == (0, f"exported 2 plans to {path}\n", "")
    assert set(read_plan_file(path).plans) == {p.key for p in before}
    assert run(capsys, "clear") == (0, f"removed 2 plans from {autojac.cache_path()}\n", "")
    assert autojac.plans() == []
    code, out, _ = run(capsys, "import", str(path))
    assert code == 0 and "2 added, 0 replaced, 0 kept, 0 invalid" in out
    assert autojac.plans() == before


def test_demo_prints_each_example_with_its_speed_ups(capsys, monkeypatch):
    seed = demo.examples()[0]
    monkeypatch.setattr(demo, "examples", lambda: [seed])
    code, out, _ = run(capsys, "demo", "--min-time", "0.01")
    assert code == 0 and "== the seed problem" in out and "vmap(jacrev)" in out
    assert re.search(r"ms: \d+\.\dx (faster|slower)", out)
    assert autojac.plans() == []  # the demo's plans stayed in its own memory, not in the user's cache


def _one_line_error(code, out, err, expected_code, *fragments):
    assert code == expected_code and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("autojac: error: ")
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize("argv, fragments", [
    ([], ["required: COMMAND"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    (["warm", "cli_models:make"], ["--input-shape"]),
    (["warm", "cli_models:make", "--input-shape", "4,a"], ["'4,a' is not a shape"]),
    (["warm", "cli_models:make", "--input-shape", "4,-5"], ["size below 1"]),
    (["warm", "cli_models:make", "--input-shape", "0,5"], ["size below 1"]),
    (["warm", "cli_models:make", "--input-shape", "4,5", "--dtype", "int8"], ["invalid choice: 'int8'"]),
    (["warm", "cli_models:make", "--input-shape", "4,5", "--device", "toaster"], ["'toaster' is not a device"]),
    (["warm", "no_colon", "--input-shape", "4,5"], ["'no_colon' is not MODULE:ATTR"]),
    (["warm", "no_such_module_xyz:f", "--input-shape", "4,5"], ["cannot import 'no_such_module_xyz'"]),
    (["warm", "cli_models:nothing", "--input-shape", "4,5"], ["has no attribute 'nothing'"]),
    (["warm", "cli_models:not_callable", "--input-shape", "4,5"], ["int object is not callable"]),
    (["warm", "cli_models:makes_a_number", "--input-shape", "4,5"], ["returned a int, not a callable"]),
    (["warm", "cli_models:make", "--input-shape", "4,5", "--op", "jacobain"],
     ["unknown operation 'jacobain' for --op"]),
    (["explain", "cli_models:make"], ["needs at least one --input-shape"]),
    (["export"], ["required: PATH"]),
    (["plans", "--jsn"], ["unrecognized arguments: --jsn"]),
    (["plans", "--device", "toaster"], ["'toaster' is not a device"]),
    (["plans", "--op", "nonsense"], ["unknown operation 'nonsense' for --op"]),
])
def test_bad_arguments_are_usage_errors_on_one_line(capsys, models, argv, fragments):
    _one_line_error(*run(capsys, *argv), 2, *fragments)


@pytest.mark.parametrize("argv, fragments", [
    (["warm", "cli_broken:f", "--input-shape", "4,5"], ["RuntimeError: this module fails on import"]),
    (["import", "{tmp}/missing.json"], ["FileNotFoundError"]),
    (["import", "{tmp}/garbage.json"], ["is not an autojac plan file"]),
    (["warm", "cli_models:f", "--input-shape", "4,5", "--device", "meta"], ["ValueError", "meta device"]),
])
def test_failures_exit_1_with_one_line(capsys, models, tmp_path, argv, fragments):
    (tmp_path / "garbage.json").write_text("garbage")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    _one_line_error(*run(capsys, *argv), 1, *fragments)


def test_import_into_an_unwritable_cache_fails(capsys, models, tmp_path, monkeypatch):
    run(capsys, "warm", "cli_models:make", "--input-shape", "4,5")
    run(capsys, "export", str(tmp_path / "plans.json"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(blocker / "cache"))
    from autojac.cache import default_store
    from autojac.planner import Planner, set_default_planner

    set_default_planner(Planner(default_store()))
    code, out, err = run(capsys, "import", str(tmp_path / "plans.json"))
    assert code == 1 and out == ""
    assert "autojac: warning: cannot write the plan cache" in err  # the store's one warning, on one line
    assert err.splitlines()[-1].startswith("autojac: error: OSError: could not write the plan cache")


def test_warm_into_an_unwritable_cache_fails_rather_than_pass_without_plans(capsys, models, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(blocker / "cache"))
    from autojac.cache import default_store
    from autojac.planner import Planner, set_default_planner

    set_default_planner(Planner(default_store()))
    code, out, err = run(capsys, "warm", "cli_models:make", "--input-shape", "4,5")
    assert code == 1 and "[1/1]" in out
    assert err.splitlines()[-1].startswith("autojac: error: OSError: could not write the plan cache")
    assert "made 1 plan but stored none" in err


def test_a_failure_with_many_reasons_keeps_them_on_its_one_line(capsys, models, monkeypatch):
    from autojac import memory

    monkeypatch.setattr(memory, "budget_bytes", lambda device: 1)  # nothing fits
    code, out, err = run(capsys, "warm", "cli_models:make", "--input-shape", "4,5")
    _one_line_error(code, out, err, 1, "NoCandidateError", "why each failed: jet_jacobian_rev: needs about",
                    "; sum_rev: needs about", "; loop_rev: needs about", "Try a smaller batch")


def test_export_into_a_missing_directory_names_the_file(capsys, models, tmp_path):
    target = tmp_path / "missing" / "plans.json"
    code, out, err = run(capsys, "export", str(target))
    _one_line_error(code, out, err, 1, f"cannot write {target}: No such file or directory")
    assert ".tmp" not in err


def test_python_dash_m_autojac_reports_a_missing_module_with_exit_code_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "AUTOJAC_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "autojac", "warm", "no_such_module_xyz:f", "--input-shape", "2,3"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["autojac: error: cannot import 'no_such_module_xyz': no module named "
                                        "'no_such_module_xyz' (is it on PYTHONPATH, or in the current directory?)"]


# -- progress of `autojac warm` ------------------------------------------------------------------

def test_warm_shows_a_bar_on_a_terminal_with_tqdm(capsys, models, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, "warm", "cli_models:make", "--input-shape", "4,5", "--input-shape", "7,5")
    assert code == 0, err
    assert "jacobian B=7 in=(5,)" in err and "2/2" in err and "plan" in err  # the bar, on stderr
    lines = out.splitlines()  # stdout is as without the bar
    assert lines[0].startswith("[1/2] jacobian of ") and lines[1].startswith("[2/2] jacobian of ")
    assert lines[2] == f"2 plans in {autojac.cache_path()}"


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal without tqdm", "not a terminal"])
def test_warm_prints_plain_lines_without_tqdm_or_a_terminal(capsys, models, monkeypatch, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm fails
    code, out, err = run(capsys, "warm", "cli_models:make", "--input-shape", "4,5")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("[1/1] jacobian of Net B=4 in=(5,) float32 cpu: ")


def test_warm_verbose_logs_what_is_tuned_and_each_candidate(capsys, models, caplog):
    try:
        code, _, err = run(capsys, "-vv", "warm", "cli_models:make", "--input-shape", "4,5")
    finally:
        logging.getLogger("autojac").setLevel(logging.NOTSET)
    assert code == 0, err
    (plan,) = autojac.plans()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "autojac"]
    start = f"tuning jacobian of Net [B=4 in=(5,) out=(3,) float32 cpu]: {len(plan.memory)} candidates"
    assert messages[0][0] == logging.INFO and messages[0][1].startswith(start)  # first, before any candidate
    tried = {m.split(", ")[1].split(":")[0] for level, m in messages if m.startswith("candidate ")
             and level == logging.DEBUG}
    assert set(plan.timings) <= tried <= set(plan.memory)  # each candidate run, once, at DEBUG
    assert messages[-1][0] == logging.INFO and messages[-1][1].startswith("tuned jacobian of Net")
