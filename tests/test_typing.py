"""Type checking as CI runs it: mypy is clean on the package under pyproject.toml's settings
(strict), a typed user script passes mypy --strict and runs, and misuse (`op="jacobain"`) is
reported where tests/typecheck/misuse.py says."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "typecheck"
MARK = re.compile(r"#\s*error:\s*([a-z-]+)\s*$")
REPORTED = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


def _expected(path: Path) -> set[tuple[int, str]]:
    """(line, error code) for every line marked `# error: CODE`."""
    return {(number, match.group(1)) for number, text in enumerate(path.read_text().splitlines(), 1)
            if (match := MARK.search(text))}


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (it is in the test extra: pip install -e '.[test]')")
def test_mypy_passes_the_package_and_a_strict_user_script_and_catches_misuse():
    # One run for all three (a cold cache spends most of its time reading torch): the package under
    # pyproject's [tool.mypy] settings, the scripts under its global `strict = true`, as --strict.
    files = ["src/autojac", "tests/typecheck/typed_usage.py", "tests/typecheck/misuse.py"]
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", *files], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    reported: dict[str, set[tuple[int, str]]] = {}
    for line in done.stdout.splitlines():
        match = REPORTED.match(line)
        if match:
            reported.setdefault(Path(match["path"]).as_posix(), set()).add((int(match["line"]), match["code"]))
    misuse = "tests/typecheck/misuse.py"
    assert set(reported) <= {misuse}, done.stdout  # the package and the typed script are clean
    assert reported.get(misuse, set()) == _expected(SCRIPTS / "misuse.py"), done.stdout
    assert "jacobain" in done.stdout
    assert done.returncode == 1, done.stdout + done.stderr  # errors found, and no crash (2)


def test_the_typed_user_script_runs():
    spec = importlib.util.spec_from_file_location("typed_usage", SCRIPTS / "typed_usage.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lines = script.main()
    assert len(lines) == 7
    assert lines[0].startswith("jacobian of Sequential") and "laplacian of Sequential" in lines[4]
    assert re.search(r"2 warmed, [12] stored", lines[5]), lines[5]
    assert "no_such_strategy" in lines[6]
