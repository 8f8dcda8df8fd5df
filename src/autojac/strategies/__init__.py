"""Strategies and their registry; importing this package registers every family."""

from . import jacobian as _jacobian  # noqa: F401  (registers the first-order strategies)
from . import hessian as _hessian  # noqa: F401  (second order: Hessians, and the coupled fallback)
from . import hvp as _hvp  # noqa: F401  (Hessian-vector products)
from . import diagonal as _diagonal  # noqa: F401  (Hessian diagonals and Laplacians)
from . import jet as _jet  # noqa: F401  (the structure-aware engine: one pass, any f it has rules for)
from . import divergence as _divergence  # noqa: F401  (traces of square Jacobians)
from . import derivatives as _derivatives  # noqa: F401  (several derivatives at once)
from .registry import BATCH_INDEPENDENT, VMAP, Strategy, all_strategies, for_op, get, heuristic, names, register

__all__ = ["BATCH_INDEPENDENT", "VMAP", "Strategy", "all_strategies", "for_op", "get", "heuristic", "names", "register"]
