"""The public API for plans: plans(), cache_path(), clear_cache(), export/import, warm(),
AUTOJAC_REQUIRE_PLAN, and the checked-in JSON Schema of plan files."""

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import autojac
from autojac import api, cache
from autojac.cache import FILE_NAME, read_plan_file, schema_text
from autojac.models import FORMAT_VERSION, PlanFile
from autojac.planner import Planner, default_planner, set_default_planner

from helpers import ScalarOut, assert_close, loop_jacobian, mlp

ROOT = Path(__file__).resolve().parent.parent


def _fresh_process(monkeypatch, cache_dir: Path) -> None:
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(cache_dir))
    set_default_planner(Planner(cache.default_store()))


def _no_planning(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("planned although a stored plan should have been used")

    monkeypatch.setattr(default_planner(), "_make", refuse)


def test_the_checked_in_schema_matches_the_models():
    assert (ROOT / "cache_schema.json").read_text() == schema_text(), \
        "cache_schema.json is stale: run `autojac schema -o cache_schema.json`"
    schema = json.loads(schema_text())
    assert set(schema["required"]) == {"format", "format_version", "entries"}
    plan_fields = schema["$defs"]["Plan"]["properties"]
    assert all(field.get("description") for field in plan_fields.values())  # every field says what it is


def test_cache_path_is_in_AUTOJAC_CACHE_DIR():
    assert autojac.cache_path() == Path(os.environ["AUTOJAC_CACHE_DIR"]) / FILE_NAME


def test_plans_lists_every_stored_plan_and_filters_by_op_and_device():
    f = mlp(5, 3)
    made = [autojac.explain(f, torch.randn(b, 5), tune=False) for b in (5, 3)]
    found = autojac.plans()
    assert found == sorted(made, key=lambda p: p.batch_size)
    assert all(isinstance(p, autojac.Plan) for p in found)
    assert autojac.plans(op="jacobian") == found and autojac.plans(op="hessian") == []
    assert autojac.plans(device="cpu") == found and autojac.plans(device=torch.device("cpu")) == found
    assert autojac.plans(device="cuda:0") == []


def test_clear_cache_forgets_every_plan_on_disk_and_in_memory():
    f, x = mlp(5, 3), torch.randn(4, 5)
    first = autojac.explain(f, x, tune=False)
    autojac.explain(f, torch.randn(6, 5), tune=False)
    assert autojac.clear_cache() == 2
    assert autojac.plans() == [] and read_plan_file(autojac.cache_path()).plans == {}
    assert autojac.explain(f, x, tune=False).created > first.created  # planned again


def test_export_then_import_into_an_empty_cache_reproduces_the_plans(tmp_path, monkeypatch):
    f, g = mlp(5, 3), ScalarOut()
    autojac.explain(f, torch.randn(4, 5))
    autojac.explain(g, torch.randn(3, 4), tune=False)
    before = autojac.plans()
    exported = tmp_path / "plans.json"
    assert autojac.export_plans(exported) == 2

    _fresh_process(monkeypatch, tmp_path / "empty")
    assert autojac.plans() == []
    counts = autojac.import_plans(exported)
    assert (counts.added, counts.replaced, counts.kept, counts.skipped) == (2, 0, 0, 0)
    assert autojac.plans() == before
    _fresh_process(monkeypatch, tmp_path / "empty")  # the imported plans are on disk
    _no_planning(monkeypatch)
    assert autojac.plans() == before
    x = torch.randn(4, 5)
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
    assert autojac.import_plans(exported) == autojac.ImportCounts(kept=2)  # importing again changes nothing


def test_import_prefers_tuned_then_newer_plans_and_counts_what_it_skips(tmp_path):
    f = mlp(5, 3)
    heuristic = autojac.explain(f, torch.randn(2, 5), tune=False)
    tuned = autojac.explain(f, torch.randn(3, 5), tune=False).model_copy(update={"tuned": True})
    older = autojac.explain(f, torch.randn(4, 5), tune=False)
    default_planner().store.merge([tuned])
    later = timedelta(hours=1)
    incoming = [
        heuristic.model_copy(update={"tuned": True, "created": heuristic.created - later}),  # tuned beats newer
        tuned.model_copy(update={"tuned": False, "created": tuned.created + later}),  # heuristic loses
        older.model_copy(update={"created": older.created + later}),  # same kind, newer wins
        older.model_copy(update={"key": "f" * 32, "torch_version": "1.0"}),  # another torch
        older.model_copy(update={"key": "e" * 32, "strategy": "no_such"}),  # unknown strategy
    ]
    data = json.loads(PlanFile(format="autojac-plans", format_version=FORMAT_VERSION,
                               entries={p.key: p for p in incoming}).model_dump_json())
    data["entries"]["d" * 32] = {"key": "d" * 32, "strategy": 3}  # not a plan
    data["entries"]["c" * 32] = json.loads(older.model_dump_json())  # under another plan's key
    path = tmp_path / "incoming.json"
    path.write_text(json.dumps(data))

    counts = autojac.import_plans(path)
    assert counts == autojac.ImportCounts(added=0, replaced=2, kept=1, invalid=3, foreign=1)
    stored = {p.key: p for p in autojac.plans()}
    assert stored[heuristic.key] == incoming[0] and stored[tuned.key] == tuned and stored[older.key] == incoming[2]
    assert "2 replaced" in str(counts) and "1 from another torch version" in str(counts)


@pytest.mark.parametrize("content, error", [
    ("not json", "is not an autojac plan file"),
    ('{"format": "something-else", "format_version": 1, "entries": {}}', "its format is 'something-else'"),
    ('{"format": "autojac-plans", "format_version": 7, "entries": {}}', "format version 7"),
])
def test_importing_a_file_that_is_not_a_plan_file_raises(tmp_path, content, error):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(autojac.PlanFileError, match=error):
        autojac.import_plans(path)
    with pytest.raises(FileNotFoundError):
        autojac.import_plans(tmp_path / "missing.json")


def test_warm_tunes_now_even_with_tuning_off_and_returns_the_plans(monkeypatch):
    monkeypatch.setenv("AUTOJAC_TUNE", "0")
    f, x = mlp(5, 3), torch.randn(4, 5)
    asked = []
    real = api.plan_for
    monkeypatch.setattr(api, "plan_for", lambda op, *a, **k: (asked.append(op), real(op, *a, **k))[1])
    (plan,) = autojac.warm(f, x)
    assert plan.tuned and plan.timings and asked == ["jacobian"]  # made by the same path as explain
    assert autojac.plans() == [plan]
    _no_planning(monkeypatch)
    assert autojac.warm(f, x) == [plan]  # a tuned plan is not tuned again
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))


def test_warm_makes_the_plan_of_a_set_of_derivatives_that_the_call_then_serves(monkeypatch):
    f, x = mlp(3, 1, width=8), torch.randn(6, 3)
    (plan,) = autojac.warm(f, x, ops=("derivatives",), quantities=("value", "hessian_diag"), tune=False)
    assert plan.op == "derivatives"
    monkeypatch.setenv("AUTOJAC_REQUIRE_PLAN", "1")  # the call finds the warmed plan: no error
    found = autojac.derivatives(f, x, ops=("value", "hessian_diag"))
    assert found.hessian_diag is not None and found.hessian_diag.shape == (6, 1, 3)
    with pytest.raises(autojac.PlanRequiredError, match=r"quantities=\('value', 'hessian'\)"):
        autojac.derivatives(f, x, ops=("value", "hessian"))  # another set: another plan, and the advice says so


def test_warm_refuses_unknown_operations_naming_the_known_ones():
    f, x = mlp(5, 3), torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"unknown operation 'jacobain'; known: .*jacobian"):
        autojac.warm(f, x, ops=("jacobain",))
    with pytest.raises(TypeError, match="sequence of operation names"):
        autojac.warm(f, x, ops="jacobian")


def test_require_plan_raises_on_a_miss_and_passes_after_warming(monkeypatch):
    monkeypatch.setenv("AUTOJAC_REQUIRE_PLAN", "1")
    f, x = mlp(5, 3), torch.randn(4, 5)
    with pytest.raises(autojac.PlanRequiredError) as caught:
        autojac.jacobian(f, x)
    message = str(caught.value)
    for part in ("jacobian of Sequential", "B=4", "in=(5,)", "float32", "cpu", "AUTOJAC_REQUIRE_PLAN=1",
                 "autojac.warm(f, x", "--input-shape 4,5", str(autojac.cache_path())):
        assert part in message
    with pytest.raises(autojac.PlanRequiredError):
        autojac.explain(f, x)
    assert autojac.plans() == []  # nothing was planned

    autojac.warm(f, x)
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
    assert autojac.explain(f, x).tuned


def test_require_plan_names_the_training_mode_to_warm_in(monkeypatch):
    monkeypatch.setenv("AUTOJAC_REQUIRE_PLAN", "1")
    model, x = mlp(5, 3).eval(), torch.randn(4, 5)
    with pytest.raises(autojac.PlanRequiredError, match="--op jacobian --eval`"):
        autojac.jacobian(model, x)
    model.train()
    with pytest.raises(autojac.PlanRequiredError, match="--op jacobian`"):
        autojac.jacobian(model, x)


def test_require_plan_accepts_a_stored_heuristic_plan_without_tuning(monkeypatch):
    f, x = mlp(5, 3), torch.randn(4, 5)
    stored = autojac.explain(f, x, tune=False)
    monkeypatch.setenv("AUTOJAC_REQUIRE_PLAN", "1")
    _no_planning(monkeypatch)
    assert autojac.explain(f, x) == stored
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
