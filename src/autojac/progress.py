"""Progress of a command that makes plans one after another (`autojac warm`).

On a terminal, with tqdm installed (the `progress` extra: pip install "autojac[progress]"), a
bar on stderr names the plan being made; otherwise, and whenever stderr is not a terminal (CI
logs, pipes), nothing but the plain lines. Either way each finished plan's line goes to stdout.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, Protocol


class Progress(Protocol):
    def start(self, what: str) -> None:
        """A plan is being made now: `what` names it."""

    def done(self, line: str) -> None:
        """It is made: `line` says how."""


class PlainLines:
    """One line per finished plan, on stdout."""

    def start(self, what: str) -> None:
        pass

    def done(self, line: str) -> None:
        print(line, flush=True)


class Bar:
    """A tqdm bar over the plans; finished plans' lines are printed above it."""

    def __init__(self, bar: Any):
        self.bar = bar

    def start(self, what: str) -> None:
        self.bar.set_description_str(what)

    def done(self, line: str) -> None:
        self.bar.write(line, file=sys.stdout)
        self.bar.update(1)


@contextlib.contextmanager
def progress(total: int, unit: str = "plan") -> Iterator[Progress]:
    """A bar when stderr is a terminal and tqdm is installed, else plain lines. Log records of
    configured handlers (`autojac -v`) are printed above the bar, not through it."""
    if not _is_terminal(sys.stderr):
        yield PlainLines()
        return
    try:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        yield PlainLines()
        return
    with tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar, \
            logging_redirect_tqdm():
        yield Bar(bar)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
