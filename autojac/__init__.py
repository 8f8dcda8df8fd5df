"""autojac: autotuned per-sample derivatives for PyTorch."""

from ._version import __version__
from .api import explain, jacobian
from .errors import AutojacError, AutojacWarning, NoCandidateError, NonDeterministicError
from .models import Plan

__all__ = [
    "AutojacError",
    "AutojacWarning",
    "NoCandidateError",
    "NonDeterministicError",
    "Plan",
    "__version__",
    "explain",
    "jacobian",
]
