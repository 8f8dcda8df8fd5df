"""Where plans are kept. The planner asks a `PlanStore`; this module has the in-memory one."""

from __future__ import annotations

import threading
from typing import Protocol

from .models import Plan


class PlanStore(Protocol):
    """What the planner needs from a plan store."""

    def get(self, key: str) -> Plan | None:
        """The plan stored under `key`, or None."""

    def put(self, plan: Plan) -> None:
        """Store `plan` under `plan.key`, replacing any plan there."""

    def plans(self) -> list[Plan]:
        """Every stored plan."""

    def clear(self) -> None:
        """Forget every plan."""


class MemoryStore:
    """Plans for the life of the process."""

    def __init__(self) -> None:
        self._plans: dict[str, Plan] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Plan | None:
        return self._plans.get(key)

    def put(self, plan: Plan) -> None:
        with self._lock:
            self._plans[plan.key] = plan

    def plans(self) -> list[Plan]:
        with self._lock:
            return list(self._plans.values())

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
