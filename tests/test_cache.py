"""The plan cache on disk: across processes, under concurrent writers, with corrupt files,
unwritable directories, untrustworthy entries, shipped plan files and crafted input."""

import json
import os
import subprocess
import sys
import tracemalloc
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

import autojac
from autojac import cache, planner as planner_module
from autojac.cache import FILE_NAME, DiskStore, read_plan_file
from autojac.errors import AutojacWarning, PlanFileError
from autojac.models import FORMAT_VERSION, PlanFile
from autojac.planner import Planner, default_planner, set_default_planner

from helpers import assert_close, loop_jacobian, mlp

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "AUTOJAC_CACHE_DIR": str(cache_dir), "AUTOJAC_TUNE_BUDGET": "0.2", "OMP_NUM_THREADS": "1"}


def _worker(cache_dir: Path, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "cache_worker.py"), *map(str, args)], env=_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output


def _new_process_planner() -> Planner:
    """What a new process would have: a fresh planner reading the cache directory afresh."""
    planner = Planner(cache.default_store())
    set_default_planner(planner)
    return planner


def _cache_file() -> Path:
    return Path(os.environ["AUTOJAC_CACHE_DIR"]) / FILE_NAME


def _no_planning(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("planned although a stored plan should have been used")

    monkeypatch.setattr(default_planner(), "_make", refuse)


# -- across processes -------------------------------------------------------------------------

def test_a_plan_tuned_in_one_process_is_used_by_the_next_without_tuning(tmp_path):
    cache_dir = tmp_path / "cache"
    _finish(_worker(cache_dir, "tune", 6, tmp_path / "first.json"))
    _finish(_worker(cache_dir, "use", 6, tmp_path / "second.json"))
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("first.json", "second.json"))

    assert first["plan"]["tuned"] and first["entered"]["timed"] == 1
    assert second["plan"] == first["plan"]  # the very plan: same key, strategy, timings and time of creation
    assert second["entered"] == {"plan": 0, "probes": 0, "timed": 0}  # no planning, no probe, no timing
    assert first["correct"] and second["correct"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the eight workers are forked")
def test_eight_processes_tuning_at_once_leave_eight_valid_plans(tmp_path):
    cache_dir = tmp_path / "cache"
    batches = [2, 5, 11, 23, 47, 95, 191, 383]  # more than 2x apart: none reuses another's plan
    _finish(_worker(cache_dir, "fan-out", tmp_path / "w", *batches))  # eight processes, started together

    loaded = read_plan_file(cache_dir / FILE_NAME)
    assert loaded.invalid == 0
    assert sorted(plan.batch_size for plan in loaded.plans.values()) == batches
    assert all(plan.tuned for plan in loaded.plans.values())
    reports = [json.loads((tmp_path / f"w{b}.json").read_text()) for b in batches]
    assert {r["plan"]["key"]: r["plan"] for r in reports} == {k: p.model_dump(mode="json")
                                                              for k, p in loaded.plans.items()}
    assert not list(cache_dir.glob("*.tmp"))  # no temporary file left behind


def test_plans_written_by_another_process_meanwhile_are_kept_and_found():
    directory = Path(os.environ["AUTOJAC_CACHE_DIR"])
    f = mlp(5, 3)
    ours, theirs = DiskStore(directory), DiskStore(directory)  # two processes, as far as the file knows
    assert ours.plans() == []  # read the (missing) file once
    set_default_planner(Planner(theirs))
    their_plan = autojac.explain(f, torch.randn(4, 5), tune=False)
    assert ours.get(their_plan.key) == their_plan  # a miss in memory looks at the file again: it changed
    set_default_planner(Planner(ours))
    our_plan = autojac.explain(f, torch.randn(7, 5), tune=False)

    assert set(read_plan_file(directory / FILE_NAME).plans) == {their_plan.key, our_plan.key}


# -- corrupt files ----------------------------------------------------------------------------

def _valid_file_text() -> str:
    plan = autojac.explain(mlp(5, 3), torch.randn(2, 5), tune=False)
    return PlanFile(format="autojac-plans", format_version=FORMAT_VERSION, entries={plan.key: plan}).model_dump_json()


@pytest.mark.parametrize("content", ["truncated", "garbage", "empty", "other json", "other version"])
def test_a_corrupt_cache_file_is_set_aside_with_a_warning_and_rebuilt(content):
    text = {
        "truncated": lambda: _valid_file_text()[:-40],
        "garbage": lambda: "\x00\xffnot json at all {{{",
        "empty": lambda: "",
        "other json": lambda: json.dumps({"hello": [1, 2, 3]}),
        "other version": lambda: _valid_file_text().replace(f'"format_version":{FORMAT_VERSION}',
                                                            '"format_version":99'),
    }[content]()
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    _new_process_planner()
    f, x = mlp(5, 3), torch.randn(4, 5)
    with pytest.warns(AutojacWarning, match="moved it to .*corrupt-") as caught:
        result = autojac.jacobian(f, x)

    assert_close(result, loop_jacobian(f, x))
    aside = list(path.parent.glob(FILE_NAME + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == text.encode("utf-8", "surrogateescape")
    assert str(aside[0]) in str(caught[0].message)
    rebuilt = read_plan_file(path)
    assert list(rebuilt.plans) == [autojac.explain(f, x).key]


def test_an_invalid_entry_is_skipped_and_the_valid_ones_are_served(monkeypatch):
    f, x = mlp(5, 3), torch.randn(4, 5)
    plan = autojac.explain(f, x)
    data = json.loads(_cache_file().read_text())
    data["entries"]["0" * 32] = {"key": "0" * 32, "op": "jacobian", "strategy": 5}
    _cache_file().write_text(json.dumps(data))
    _new_process_planner()
    _no_planning(monkeypatch)
    with pytest.warns(AutojacWarning, match="1 entries .* not valid plans"):
        assert autojac.explain(f, x) == plan


@pytest.mark.parametrize("when", ["tuning", "writing"])
def test_an_interrupt_leaves_the_cache_file_intact_and_valid(when, monkeypatch):
    f = mlp(5, 3)
    stored = autojac.explain(f, torch.randn(3, 5), tune=False)
    before = _cache_file().read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if when == "tuning":
        monkeypatch.setattr(planner_module, "choose", interrupt)
    else:
        monkeypatch.setattr(cache.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        autojac.jacobian(f, torch.randn(5, 5))

    assert _cache_file().read_bytes() == before and read_plan_file(_cache_file()).plans == {stored.key: stored}
    assert not list(_cache_file().parent.glob("*.tmp"))  # no temporary file left behind


# -- directories that cannot be written -------------------------------------------------------

def test_a_cache_directory_that_cannot_be_created_works_from_memory_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file: no directory can be made under it, not even by root")
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(blocker / "cache"))
    _new_process_planner()
    f = mlp(5, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (3, 7, 15):  # more than 2x apart: each its own plan
            x = torch.randn(batch, 5)
            assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
        assert len(autojac.plans()) == 3

    ours = [w for w in caught if issubclass(w.category, AutojacWarning)]
    assert len(ours) == 1 and "memory only" in str(ours[0].message) and str(blocker) in str(ours[0].message)
    assert blocker.is_file() and not default_planner().store.current.writable


@pytest.mark.parametrize("how", ["chmod", "refused writes"])
def test_a_cache_in_a_read_only_directory_is_read_and_new_plans_stay_in_memory(how, monkeypatch):
    f, x_stored, x_new = mlp(5, 3), torch.randn(4, 5), torch.randn(6, 5)
    stored = autojac.explain(f, x_stored, tune=False)
    directory = _cache_file().parent
    before = _cache_file().read_bytes()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes through chmod; the 'refused writes' case covers it")
        directory.chmod(0o555)
    else:  # what a read-only directory does to autojac's writes, whoever runs the test
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(directory))

        monkeypatch.setattr(cache.tempfile, "mkstemp", refuse)
        monkeypatch.setattr(cache.filelock.FileLock, "acquire", refuse)
    try:
        _new_process_planner()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert autojac.explain(f, x_stored, tune=False) == stored  # read from the file
            assert_close(autojac.jacobian(f, x_new), loop_jacobian(f, x_new))
            autojac.explain(f, torch.randn(13, 5), tune=False)
    finally:
        directory.chmod(0o755)
    ours = [w for w in caught if issubclass(w.category, AutojacWarning)]
    assert len(ours) == 1 and "memory only" in str(ours[0].message)
    assert len(autojac.plans()) == 3 and _cache_file().read_bytes() == before


# -- entries that must not be trusted ---------------------------------------------------------

def _write_entries(*plans) -> None:
    file = PlanFile(format="autojac-plans", format_version=FORMAT_VERSION, entries={p.key: p for p in plans})
    _cache_file().parent.mkdir(parents=True, exist_ok=True)
    _cache_file().write_text(file.model_dump_json())


@pytest.mark.parametrize("change", [
    {"strategy": "no_such_strategy"},
    {"strategy": "full_diag", "op": "hessian"},  # a real strategy, but not for that operation
    {"torch_version": "1.0.0"},
    {"strategy": "sum_rev", "batch_independent": False},  # a strategy its own probes rule out
    {"fn_name": "SomethingElse"},  # a plan for another f under this key
])
def test_a_stored_plan_that_cannot_be_trusted_is_ignored(change):
    f, x = mlp(5, 3), torch.randn(4, 5)
    real = autojac.explain(f, x, tune=False)
    old = datetime(2020, 1, 1, tzinfo=timezone.utc)
    crafted = real.model_copy(update={**change, "tuned": True, "created": old})
    _write_entries(crafted)
    _new_process_planner()
    plan = autojac.explain(f, x, tune=False)

    assert plan.created > old and plan.strategy == real.strategy  # made afresh, not taken from the file
    if "fn_name" not in change:  # the store itself can tell these are unusable; a plan for another f
        assert crafted not in autojac.plans()  # under this key, only the planner can
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))


# -- plan files shipped with an application ---------------------------------------------------

def test_plans_from_AUTOJAC_PLANS_are_used_read_only_and_survive_clear(tmp_path, monkeypatch):
    f, x = mlp(5, 3), torch.randn(4, 5)
    plan = autojac.explain(f, x)
    shipped = tmp_path / "shipped.json"
    assert autojac.export_plans(shipped) == 1
    content = shipped.read_bytes()
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("AUTOJAC_PLANS", str(shipped))
    _new_process_planner()
    _no_planning(monkeypatch)

    assert autojac.explain(f, x) == plan
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
    assert autojac.clear_cache() == 0 and autojac.plans() == [plan]
    assert shipped.read_bytes() == content and not (tmp_path / "empty-cache" / FILE_NAME).exists()


def test_a_tuned_shipped_plan_beats_a_heuristic_one_in_the_user_cache(tmp_path, monkeypatch):
    f, x = mlp(5, 3), torch.randn(4, 5)
    tuned = autojac.explain(f, x)
    shipped = tmp_path / "shipped.json"
    autojac.export_plans(shipped)
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(tmp_path / "other-cache"))
    _new_process_planner()
    assert not autojac.explain(f, x, tune=False).tuned  # a heuristic plan in the user cache
    monkeypatch.setenv("AUTOJAC_PLANS", str(shipped))
    _new_process_planner()
    assert autojac.explain(f, x) == tuned


def test_a_missing_or_broken_AUTOJAC_PLANS_file_is_ignored_with_a_warning(tmp_path, monkeypatch):
    (tmp_path / "broken.json").write_text("{")
    files = [str(tmp_path / "missing.json"), str(tmp_path / "broken.json")]
    monkeypatch.setenv("AUTOJAC_PLANS", os.pathsep.join(files))
    _new_process_planner()
    f, x = mlp(5, 3), torch.randn(4, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
    messages = [str(w.message) for w in caught if issubclass(w.category, AutojacWarning)]
    assert len(messages) == 2 and "missing.json" in messages[0] and "broken.json" in messages[1]
    assert (tmp_path / "broken.json").read_text() == "{"


# -- the hot path -----------------------------------------------------------------------------

def test_a_cached_call_never_asks_the_store(monkeypatch):
    f, x = mlp(5, 3), torch.randn(4, 5)
    autojac.jacobian(f, x)

    def refuse(*args, **kwargs):
        raise AssertionError("the store was asked on a hit")

    monkeypatch.setattr(default_planner().store, "get", refuse)
    monkeypatch.setattr(cache, "read_plan_file", refuse)
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))


def test_the_file_is_read_once_per_process(monkeypatch):
    f = mlp(5, 3)
    plans = [autojac.explain(f, torch.randn(b, 5), tune=False) for b in (3, 4)]
    reads = []
    real = cache.read_plan_file
    monkeypatch.setattr(cache, "read_plan_file", lambda *a, **k: (reads.append(a), real(*a, **k))[1])
    _new_process_planner()
    assert [autojac.explain(f, torch.randn(b, 5), tune=False) for b in (3, 4)] == plans
    assert len(reads) == 1


# -- crafted files: rejected, nothing crashes, nothing runs -----------------------------------

def _crafted(kind: str, marker: Path) -> bytes:
    plan = json.loads(autojac.explain(mlp(5, 3), torch.randn(4, 5), tune=False).model_dump_json())
    command = f"__import__('os').system('touch {marker}')"

    def file_with(**changes) -> bytes:
        entry = {**plan, **changes}
        return json.dumps({"format": "autojac-plans", "format_version": FORMAT_VERSION,
                           "entries": {entry.get("key", plan["key"]) if isinstance(entry.get("key"), str)
                                       else plan["key"]: entry}}).encode()

    return {
        "huge integer": lambda: file_with(batch_size=10**40),
        "thousands of digits": lambda: file_with(chunk=int("9" * 4000)),
        "infinite time": lambda: file_with(timings={"sum_rev": 1e999}),
        "negative size": lambda: file_with(in_shape=[-5]),
        "wrong types": lambda: file_with(strategy=["sum_rev"], tuned="yes please", in_shape="abc"),
        "entries not a mapping": lambda: b'{"format": "autojac-plans", "format_version": 1, "entries": [1, 2]}',
        "code as strategy": lambda: file_with(strategy=command),
        "code as key": lambda: file_with(key=command),
        "deep nesting": lambda: b'{"format": "autojac-plans", "format_version": 1, "entries": {"a": '
                                + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        "pickle": lambda: b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        "time without a zone": lambda: file_with(created="2020-01-01T00:00:00"),
        "time in the future": lambda: file_with(created="9999-12-31T23:59:59Z"),
        "binary junk": lambda: os.urandom(200_000),
    }[kind]()


@pytest.mark.parametrize("kind", ["huge integer", "thousands of digits", "infinite time", "negative size",
                                  "wrong types", "entries not a mapping", "code as strategy", "code as key",
                                  "deep nesting", "pickle", "binary junk", "time without a zone",
                                  "time in the future"])
def test_a_crafted_cache_file_is_rejected_without_crashing_or_running_code(kind, tmp_path):
    marker = tmp_path / "code-ran"
    data = _crafted(kind, marker)
    _cache_file().parent.mkdir(parents=True, exist_ok=True)
    _cache_file().write_bytes(data)
    _new_process_planner()
    f, x = mlp(5, 3), torch.randn(4, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = autojac.explain(f, x, tune=False)
        assert_close(autojac.jacobian(f, x, tune=False), loop_jacobian(f, x))

    assert plan.strategy in {"sum_rev", "sum_grad", "sum_fwd", "loop_rev", "vmap_rev", "vmap_fwd", "jet_jacobian_fwd",
                             "jet_jacobian_rev", "jet_jacobian_meet"}
    if kind != "code as strategy":  # a valid plan of a strategy not known here is skipped quietly
        assert any(issubclass(w.category, AutojacWarning) for w in caught)  # said what it rejected
    assert not marker.exists()
    assert read_plan_file(_cache_file()).plans == {plan.key: plan}  # rebuilt from valid plans only


def test_100_MB_of_junk_is_refused_unread(tmp_path):
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:  # sparse: 100 MB that costs no disk
        out.truncate(100 * 2**20)
        out.seek(50 * 2**20)
        out.write(b"junk")
    _new_process_planner()
    tracemalloc.start()
    try:
        with pytest.warns(AutojacWarning, match="over the limit"):
            store = default_planner().store
            assert store.plans() == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # never read into memory
    assert list(path.parent.glob(FILE_NAME + ".corrupt-*"))


def test_a_directory_in_place_of_the_cache_file_is_set_aside():
    path = _cache_file()
    path.mkdir(parents=True)
    _new_process_planner()
    f, x = mlp(5, 3), torch.randn(4, 5)
    with pytest.warns(AutojacWarning, match="not a regular file.*moved it to"):
        assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
    assert path.is_file() and list(read_plan_file(path).plans) == [autojac.explain(f, x).key]
    (aside,) = path.parent.glob(FILE_NAME + ".corrupt-*")
    assert aside.is_dir()


def test_invalid_entries_are_reported_once_per_version_of_the_file():
    f, x = mlp(5, 3), torch.randn(4, 5)
    autojac.explain(f, x)
    data = json.loads(_cache_file().read_text())
    data["entries"]["0" * 32] = {"key": "0" * 32, "op": "jacobian", "strategy": 5}
    _cache_file().write_text(json.dumps(data))
    _new_process_planner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autojac.jacobian(f, torch.randn(6, 5))  # a miss: reads the file, then writes under the lock
    assert [str(w.message).count("not valid plans") for w in caught] == [1]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_in_place_of_the_file_does_not_block():
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    with pytest.raises(PlanFileError, match="not a regular file"):
        read_plan_file(path)


def test_the_store_never_grows_past_its_size_limit(monkeypatch):
    monkeypatch.setattr(cache, "MAX_FILE_BYTES", 6_000)  # room for about five heuristic plans
    f = mlp(5, 3)
    with pytest.warns(AutojacWarning, match="reached its limit"):
        made = [autojac.explain(f, torch.randn(b, 5), tune=False) for b in range(2, 12)]
    size = _cache_file().stat().st_size
    kept = read_plan_file(_cache_file()).plans
    assert size <= 6_000 and 2 <= len(kept) < len(made)
    newest = max(made, key=lambda p: p.created)
    assert newest.key in kept  # the oldest went first
    assert min(p.created for p in kept.values()) >= sorted(p.created for p in made)[len(made) - len(kept)]
