"""The structure-aware derivative engine: f is interpreted operation by operation, and each
operation's rule (from one table) carries Taylor coefficients beside its value.

    derivatives(f, x, ops=("value", "jacobian", "laplacian"))   several results in one pass: a dict
    divergence(f, x)                                            (B,): trace of a square per-sample Jacobian
    jacobian(f, x), reverse_jacobian(f, x)                      (B, *out, *in): forward, reverse mode
    second_order(op, f, x, v=None)                              laplacian, hessian_diag, hvp or hessian
    check(f, x)                                                 "" if the engine can follow f, else why not

They raise Unsupported (naming the operation) where the engine cannot follow f; check first, or
use the strategies (autojac.strategies.jet), which fall back to generic ones.

Modules: stacks (coefficient stacks), order (which coefficients), maps (linear maps and their
transposes), interpreter (the TorchFunctionMode), table (the rule table and its helpers), rules and
composites (the entries), reverse (reverse mode and meeting in the middle), api (the functions above).
"""

from . import composites as _composites  # noqa: F401  (fills the table)
from . import rules as _rules  # noqa: F401  (fills the table)
from .api import check, derivatives, divergence, jacobian, second_order
from .reverse import meet_jacobian, reverse_jacobian
from .stacks import Unsupported
from .table import RULES, TABLE, Example, Rule

__all__ = ["RULES", "TABLE", "Example", "Rule", "Unsupported", "check", "derivatives", "divergence", "jacobian",
           "meet_jacobian", "reverse_jacobian", "second_order"]
