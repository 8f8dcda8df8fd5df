"""The trust battery's machinery (benchmarks/trust.py): each outcome is classified as documented, a
crashing case never stops the run, and the report files are written."""

from __future__ import annotations

import json
import os
import warnings

import torch

import autojac
from benchmarks import trust
from benchmarks.trust_kit import Case, Finding


def _run(fn, tmp_path, allow_warnings=False):
    return trust.run_case(Case("synthetic", "test", "", fn, allow_warnings), tmp_path, budget=0.1, timeout=60)


def test_outcomes_are_classified(tmp_path):
    def crash(ctx):
        raise RuntimeError("boom\nmore")

    def stale(ctx):
        raise Finding("stale", "old plan")

    def warns(ctx):
        warnings.warn("autojac: something", autojac.AutojacWarning)

    def wrong(ctx):
        ctx.check(torch.zeros(3), torch.ones(3), "zeros")

    assert (_run(crash, tmp_path).outcome, _run(crash, tmp_path).detail) == ("crash", "RuntimeError: boom "
                                                                               "(raised inside torch)")
    assert _run(stale, tmp_path).outcome == "stale"
    assert _run(warns, tmp_path).outcome == "spurious-warning"
    assert _run(warns, tmp_path, allow_warnings=True).outcome == "ok"
    result = _run(wrong, tmp_path)
    assert result.outcome == "wrong" and "relative error 1" in result.detail


def test_a_case_runs_in_its_own_cache_and_leaves_the_environment_alone(tmp_path):
    before = os.environ.get("AUTOJAC_CACHE_DIR")
    seen = {}

    def uses_autojac(ctx):
        model = torch.nn.Linear(3, 2)
        x = torch.randn(4, 3)
        ctx.check(autojac.jacobian(model, x), model.weight.detach().expand(4, 2, 3), "jacobian of a Linear")
        seen["cache"] = autojac.cache_path()
        seen["tunings"] = ctx.tunings()

    assert _run(uses_autojac, tmp_path).outcome == "ok"
    assert str(seen["cache"]).startswith(str(tmp_path)) and seen["tunings"] == 1
    assert os.environ.get("AUTOJAC_CACHE_DIR") == before


def test_the_battery_writes_its_tables(tmp_path):
    assert len(trust.CASES) >= 90 and len({c.name for c in trust.CASES}) == len(trust.CASES)
    assert trust.main(["--out", str(tmp_path), "--only", "^batch_of_one ", "--only", "^sparse_coo_x "]) == 0
    data = json.loads((tmp_path / "trust.json").read_text())
    assert {c["name"] for c in data["cases"]} == {"batch_of_one", "sparse_coo_x"}
    assert sum(data["counts"].values()) == 2
    table = (tmp_path / "trust.md").read_text()
    assert "| case | group | expected | outcome | s |" in table and "batch_of_one" in table


def test_an_input_that_must_be_refused_but_is_accepted_is_wrong(tmp_path):
    def accepted(ctx):
        ctx.expect_refusal(lambda: None, ["x"], "a sparse x")

    def refused(ctx):
        ctx.expect_refusal(lambda: autojac.jacobian(torch.nn.Linear(3, 2), torch.randn(4, 3).to_sparse()),
                           ["x", "sparse"], "a sparse x")

    result = _run(accepted, tmp_path)
    assert result.outcome == "wrong" and "a sparse x was accepted silently" in result.detail
    assert _run(refused, tmp_path).outcome == "ok"
