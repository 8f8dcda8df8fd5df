"""Exceptions that autojac raises on purpose (bad input raises plain TypeError/ValueError)."""

from __future__ import annotations

from typing import Any


class AutojacWarning(UserWarning):
    """Something autojac worked around that the user may want to know about."""


class AutojacError(RuntimeError):
    """Base class of autojac's own failures."""


class NoCandidateError(AutojacError):
    """Every candidate strategy failed or was ruled out; the message lists each reason."""

    def __init__(self, what: str, reasons: dict[str, str], hint: str = ""):
        self.reasons = dict(reasons)
        lines = "\n".join(f"  {name}: {why}" for name, why in reasons.items()) or "  (none)"
        tail = f"\n{hint}" if hint else ""
        super().__init__(
            f"no strategy could compute the {what}; the candidates and why each failed:\n{lines}{tail}")


class NonDeterministicError(ValueError):
    """f gave different outputs on two calls with the same input."""


class PlanRequiredError(AutojacError):
    """AUTOJAC_REQUIRE_PLAN=1 and no stored plan matches the call."""

    sig: Any = None  # the call's Signature
    store: Any = None  # where the plan was looked for


class PlanFileError(AutojacError, ValueError):
    """A plan file that cannot be used as a whole: unreadable, too large, not JSON, another format."""
