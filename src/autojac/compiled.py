"""Callables made by torch.compile: tuned through the callable they compile.

A torch.compile'd module or function compiles again on its first call under each new
transform (vmap, jvp, a backward pass through a backward pass), for seconds with the default
backend: timed, that would be compile time measured as strategy time, and one compilation can
spend the whole tuning budget. So the planner probes and tunes the original callable (the same
maths on the same parameters), keeps the plan under the compiled callable's signature, and
calls then run the winning strategy on the compiled callable.
"""

from __future__ import annotations

import os
import types
from typing import Any

from torch import Tensor

from .problem import Problem

_DYNAMO = f"{os.sep}_dynamo{os.sep}"


def for_tuning(problem: Problem) -> Problem:
    """The problem with a torch.compile'd f (or base, when extra arguments are bound to it) replaced
    by what it compiles; the problem itself when nothing was compiled."""
    if problem.base is not None:
        base = original(problem.base)
        if base is problem.base:
            return problem
        args = problem.args

        def bound(x: Tensor) -> Tensor:
            return base(x, *args)

        return problem.replace(base=base, f=bound)
    f = original(problem.f)
    return problem if f is problem.f else problem.replace(f=f)


def original(f: Any) -> Any:
    """The callable torch.compile wrapped, if f is what it returned (an OptimizedModule for a
    module, dynamo's wrapper function for a function); else f itself. Cheap: types, no lookups."""
    while True:
        kind = type(f)
        if kind.__name__ == "OptimizedModule" and kind.__module__.startswith("torch._dynamo"):
            f = f._orig_mod
        elif (kind is types.FunctionType and _DYNAMO in f.__code__.co_filename
              and "_torchdynamo_orig_callable" in f.__dict__):
            # dynamo's own wrapper, by its code: functools.wraps copies the attribute onto the user's
            # wrappers of a compiled function too, and those must not be skipped
            f = f.__dict__["_torchdynamo_orig_callable"]
        else:
            return f
