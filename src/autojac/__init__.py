"""autojac: autotuned per-sample derivatives for PyTorch."""

import logging

from ._version import __version__
from .api import (Derivatives, Estimator, Quantity, derivatives, divergence, explain, hessian, hessian_diag, hvp,
                  jacobian, laplacian)
from .errors import (AutojacError, AutojacWarning, NoCandidateError, NonDeterministicError, PlanFileError,
                     PlanRequiredError)
from .manage import ImportCounts, cache_path, clear_cache, export_plans, import_plans, plans, warm
from .models import Op, Plan

# A library leaves logging to the application: nothing is printed unless it configures handlers.
logging.getLogger("autojac").addHandler(logging.NullHandler())

__all__ = [
    "AutojacError",
    "AutojacWarning",
    "Derivatives",
    "Estimator",
    "ImportCounts",
    "NoCandidateError",
    "NonDeterministicError",
    "Op",
    "Plan",
    "PlanFileError",
    "PlanRequiredError",
    "Quantity",
    "__version__",
    "cache_path",
    "clear_cache",
    "derivatives",
    "divergence",
    "explain",
    "export_plans",
    "hessian",
    "hessian_diag",
    "hvp",
    "import_plans",
    "jacobian",
    "laplacian",
    "plans",
    "warm",
]
