"""Where plans are kept. The planner asks a `PlanStore`; this module has the in-memory one, and
the rule that decides between two plans for the same signature (cache.py has the disk store)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from .models import Plan


@dataclass(frozen=True)
class MergeCounts:
    """What merging plans into a store did, plan by plan."""

    added: int = 0  # no plan had that key
    replaced: int = 0  # the new plan was preferred to the stored one
    kept: int = 0  # the stored plan was as good or better (tuned, or as new)

    def __str__(self) -> str:
        return f"{self.added} added, {self.replaced} replaced, {self.kept} kept"


class PlanStore(Protocol):
    """What the planner needs from a plan store."""

    def get(self, key: str) -> Plan | None:
        """The plan stored under `key`, or None."""

    def put(self, plan: Plan) -> None:
        """Store `plan` under `plan.key`, unless the plan there is preferred (see `preferred`)."""

    def merge(self, plans: Iterable[Plan]) -> MergeCounts:
        """Store several plans, each as `put` does; say what happened to each."""

    def plans(self) -> list[Plan]:
        """Every stored plan."""

    def clear(self) -> int:
        """Forget every plan; returns how many there were."""


def preferred(stored: Plan | None, new: Plan) -> Plan:
    """Which of two plans for one key to keep: a tuned plan over a heuristic one, then the newer;
    on a tie, the stored one (so that merging is idempotent)."""
    if stored is None or (new.tuned, new.created) > (stored.tuned, stored.created):
        return new
    return stored


def tally(stored: dict[str, Plan], incoming: Iterable[Plan]) -> tuple[dict[str, Plan], MergeCounts]:
    """Merge `incoming` into a copy of `stored` by `preferred`; the merged plans and the counts."""
    merged, counts = dict(stored), MergeCounts()
    for plan in incoming:
        old = merged.get(plan.key)
        kept = merged[plan.key] = preferred(old, plan)
        if old is None:
            counts = replace(counts, added=counts.added + 1)
        elif kept is plan and plan != old:
            counts = replace(counts, replaced=counts.replaced + 1)
        else:
            counts = replace(counts, kept=counts.kept + 1)
    return merged, counts


class MemoryStore:
    """Plans for the life of the process."""

    def __init__(self) -> None:
        self._plans: dict[str, Plan] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Plan | None:
        return self._plans.get(key)

    def put(self, plan: Plan) -> None:
        self.merge([plan])

    def merge(self, plans: Iterable[Plan]) -> MergeCounts:
        with self._lock:
            self._plans, counts = tally(self._plans, plans)
        return counts

    def plans(self) -> list[Plan]:
        with self._lock:
            return list(self._plans.values())

    def clear(self) -> int:
        with self._lock:
            count = len(self._plans)
            self._plans.clear()
        return count
