"""Environment switches, read at call time so that a test or a CI job can flip them.

AUTOJAC_TUNE=0         never benchmark: a stored plan, else the heuristic choice
AUTOJAC_TUNE_BUDGET=s  wall seconds per plan (default 1.0), probes included
"""

from __future__ import annotations

import os

_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}


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
