"""The structure-aware derivative engine: f is interpreted operation by operation, and each
operation's rule (from one table) carries Taylor coefficients beside its value.

    derivatives(f, x, ops=("value", "jacobian", "laplacian"))   several results in one pass
    divergence(f, x)                                            trace of a square per-sample Jacobian
    check(f, x)                                                 "" if the engine can follow f, else why not

Modules: stacks (coefficient stacks), order (which coefficients), maps (linear maps and their
transposes), interpreter (the TorchFunctionMode), table (the rule table and its helpers), rules and
composites (the entries), reverse (reverse mode and meeting in the middle), api (the functions above).
"""

from . import composites as _composites  # noqa: F401  (fills the table)
from . import rules as _rules  # noqa: F401  (fills the table)
from .stacks import Unsupported
from .table import RULES, TABLE, Example, Rule

__all__ = ["RULES", "TABLE", "Example", "Rule", "Unsupported"]
