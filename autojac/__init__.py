"""autojac: autotuned per-sample derivatives for PyTorch."""

from ._version import __version__
from .api import explain, hessian, hessian_diag, hvp, jacobian, laplacian
from .errors import AutojacError, NoCandidateError, NonDeterministicError
from .models import Plan
from .planner import AutojacWarning

__all__ = [
    "AutojacError",
    "AutojacWarning",
    "NoCandidateError",
    "NonDeterministicError",
    "Plan",
    "__version__",
    "explain",
    "hessian",
    "hessian_diag",
    "hvp",
    "jacobian",
    "laplacian",
]
