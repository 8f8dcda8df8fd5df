"""Environment switches, read at call time so that a test or a CI job can flip them (the cache
directory and plan files when the process-wide planner is made, on the first call).

AUTOJAC_TUNE=0           never benchmark: a stored plan, else the heuristic choice
AUTOJAC_TUNE_BUDGET=s    wall seconds per plan (default 1.0), probes included
AUTOJAC_CACHE_DIR=dir    where the plan cache lives (default: the user cache dir, from platformdirs)
AUTOJAC_PLANS=file       plan files shipped with an application (os.pathsep between several),
                         read-only, consulted after the user cache
AUTOJAC_REQUIRE_PLAN=1   a call with no stored plan raises PlanRequiredError instead of planning
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}

# Set while autojac.warm runs: warming is how a required plan comes to exist.
_warming: contextvars.ContextVar[bool] = contextvars.ContextVar("autojac_warming", default=False)


def flag(name: str, default: bool) -> bool:
    """A boolean environment switch; anything but the usual spellings is an error."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r} is not a boolean; use 1 or 0")


def tuning_enabled(tune: bool | None) -> bool:
    """The caller's `tune=` if given, else AUTOJAC_TUNE (default on)."""
    return flag("AUTOJAC_TUNE", True) if tune is None else tune


def plan_required() -> bool:
    """AUTOJAC_REQUIRE_PLAN (default off), except while autojac.warm is making plans."""
    return not _warming.get() and flag("AUTOJAC_REQUIRE_PLAN", False)


@contextlib.contextmanager
def warming() -> Iterator[None]:
    """Allow plans to be made even under AUTOJAC_REQUIRE_PLAN=1 (autojac.warm)."""
    token = _warming.set(True)
    try:
        yield
    finally:
        _warming.reset(token)


def cache_dir() -> Path:
    """AUTOJAC_CACHE_DIR, else the platform's user cache directory for autojac."""
    text = os.environ.get("AUTOJAC_CACHE_DIR", "").strip()
    if text:
        return Path(text).expanduser()
    import platformdirs  # only when needed: AUTOJAC_CACHE_DIR spares the import

    return Path(platformdirs.user_cache_dir("autojac"))


def shipped_plan_files() -> list[Path]:
    """The read-only plan files named by AUTOJAC_PLANS (separated by os.pathsep)."""
    text = os.environ.get("AUTOJAC_PLANS", "")
    return [Path(part.strip()).expanduser() for part in text.split(os.pathsep) if part.strip()]
