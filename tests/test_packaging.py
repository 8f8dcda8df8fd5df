"""What a packaged library owes its users: a license in the repository and in the metadata,
--version on both entry points, and a logger that prints nothing unless the application asks."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import autojac
from autojac import cli

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """This checkout's package first, whatever is installed."""
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))


def test_the_license_is_mit_in_the_repository_and_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the autojac authors" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # an SPDX expression, not the deprecated table
    assert project["project"]["license-files"] == ["LICENSE"]
    assert any(req.startswith("setuptools>=") and int(req.split(">=")[1].split(",")[0].split(".")[0]) >= 77
               for req in project["build-system"]["requires"])  # the first that reads both fields


def test_version_from_the_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"autojac {autojac.__version__}"


@pytest.mark.parametrize("command", [[sys.executable, "-m", "autojac"], ["autojac"]], ids=["python -m", "script"])
def test_version_from_the_shell(command):
    if shutil.which(command[0]) is None:
        pytest.skip("the autojac script is not on PATH (pip install -e . puts it there)")
    done = subprocess.run([*command, "--version"], env=_env(), capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, f"autojac {autojac.__version__}"), done.stderr


def test_the_logger_prints_nothing_unless_the_application_configures_logging(monkeypatch):
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("autojac").handlers)
    # An application without logging configured (no handler on the root logger, which pytest has):
    # without the NullHandler, Python's last-resort handler would print autojac's warnings to stderr.
    printed = io.StringIO()
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging, "lastResort", logging.StreamHandler(printed))
    logging.getLogger("autojac").warning("must not be printed")
    logging.getLogger("some.other.library").warning("printed")
    assert printed.getvalue() == "printed\n"


def test_the_readme_and_sources_point_only_at_files_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", readme)  # relative Markdown links and images
    local = [link for link in links if "://" not in link]
    assert "docs/design.md" in local and "LICENSE" in local
    assert [link for link in local if not (ROOT / link).exists()] == []
    texts = [readme, *(p.read_text() for folder in ("src", "benchmarks", "docs") for p in (ROOT / folder).rglob("*")
                       if p.suffix in (".py", ".md"))]
    assert not any("DESIGN.md" in text for text in texts)  # the design notes live in docs/design.md
