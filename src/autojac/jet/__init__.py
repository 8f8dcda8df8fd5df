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
transposes), interpreter (the TorchFunctionMode), table (the rule table and its helpers);
elementwise, algebra, layout and composites (the entries); reverse (reverse mode, meeting in the
middle, second order by adjoints), api (the functions above), memory (large results).
"""

from . import algebra as _algebra  # noqa: F401  (these four fill the table)
from . import composites as _composites  # noqa: F401
from . import elementwise as _elementwise  # noqa: F401
from . import layout as _layout  # noqa: F401
from .api import check, derivatives, divergence, jacobian, second_order
from .reverse import meet_jacobian, reverse_jacobian
from .stacks import Unsupported
from .table import RULES, TABLE, Example, Rule

__all__ = ["RULES", "TABLE", "Example", "Rule", "Unsupported", "check", "derivatives", "divergence", "jacobian",
           "meet_jacobian", "reverse_jacobian", "second_order"]
