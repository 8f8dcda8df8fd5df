"""A time cap for one call: `with deadline(seconds):` raises `Overtime` once they have passed.

The alarm is a POSIX interval timer (SIGALRM); its handler runs between Python bytecodes, so
a strategy that loops over chunks in Python stops at its next step, and one long kernel stops
when it returns. Off the main thread, or without setitimer, there is no cap.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Overtime(BaseException):
    """A call ran past its cap. A BaseException, so that autojac's tuner (which records a
    failing candidate's Exception as data) lets it through, as it does KeyboardInterrupt."""


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise Overtime in this thread after `seconds` (checked between Python bytecodes, so a
    strategy's loop over chunks stops at its next step). A no-op off the main thread."""
    usable = seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise Overtime(f"stopped after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
