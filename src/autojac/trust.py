"""Whether a plan may be served to this call: the checks that cover what the key cannot see.

The key (signature.py) holds what decides the choice of strategy; it leaves out data (weights,
captured tensors, numbers) so that training, an ODE's time or a new closure constant never make a
new plan. What that could hide is checked here, cheaply, never by tuning again:

- A plan this process did not tune (the heuristic's choice with tuning off, a plan read from the
  cache or from a file made elsewhere, a forced strategy) is cross-checked once, on its first call,
  against an independent strategy on a slice of the batch (`cross_check`). The reference is plain
  reverse-mode autograd, what users write by hand: forward mode ignores `torch.no_grad()` blocks
  inside f, and PyTorch's nested forward mode through layer_norm/batch_norm is wrong
  (pytorch#196700, #196699), so where the two disagree the reference is served.
- Batch independence is checked again as a process runs (`recheck_due`): at a served plan's calls
  16, 32, 64, ... 4096, then every 4096 calls, by `probes.quick_coupling` (one forward pass and two
  vector-Jacobian products), so that coupling which appears as weights train (a gate on a
  batch-mean term moving away from zero) is caught within a bounded number of calls; and on the
  first call of an f that holds tensors of its own (a closure over another tensor), since the key
  does not see them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .numerics import agree
from .problem import Problem
from .strategies import registry
from .strategies.registry import Strategy

# Per operation, the independent references, preferred first: plain reverse-mode autograd (its
# looped form where the vectorized backward pass cannot run).
REFERENCES: dict[str, tuple[str, ...]] = {
    "jacobian": ("sum_grad", "loop_rev"),
    "hessian": ("sum_grad_grad", "loop_grad_grad"),
    "hvp": ("hvp_rev_rev",),
    "hessian_diag": ("grad_grad_diag", "loop_diag"),
    "laplacian": ("grad_grad_diag", "loop_diag"),
    "divergence": ("div_rows", "div_loop"),
    "derivatives": ("nested_derivatives",),
}
# The scheduled re-checks of batch independence, in calls of a served plan: at FIRST_CHECK, then at
# doubling counts up to CHECK_EVERY, then every CHECK_EVERY calls. A check costs about two calls of a
# first-order strategy: 0.4% of the first 4096 calls, 0.05% after.
FIRST_CHECK = 16
CHECK_EVERY = 4096
SLICE = 4  # samples a cross-check runs on


def is_reference(op: str, name: str) -> bool:
    """Whether `name` is one of `op`'s references (a plan serving it needs no cross-check)."""
    return name in REFERENCES.get(op, ())


def next_check(calls: int) -> int:
    """The call count of the next scheduled re-check after `calls`."""
    if calls < FIRST_CHECK:
        return FIRST_CHECK
    if calls < CHECK_EVERY:
        return 1 << calls.bit_length()
    return (calls // CHECK_EVERY + 1) * CHECK_EVERY


def cross_check(problem: Problem, strategy: Strategy, chunk: int | None, dtype: torch.dtype) -> tuple[str, str]:
    """Run `strategy` and the operation's reference on a slice of the batch (the whole batch if f
    refuses a slice): ("", "") if they agree or there is no reference to ask, else (the reference's
    name, why they disagree). Computed in `dtype` (x's, f's, autocast's: the least precise)."""
    op = problem.op
    if is_reference(op, strategy.name) or strategy.coupled_only:
        return "", ""
    for name in REFERENCES.get(op, ()):
        reference = registry.get(name, op)
        for candidate in (problem.head(SLICE), problem):
            try:
                expected = reference(candidate, None)
            except Exception:  # noqa: BLE001 - a reference that cannot run here asks the next
                continue
            try:
                got = strategy(candidate, chunk)
            except Exception as error:  # noqa: BLE001 - the strategy fails where the reference runs
                return name, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            ok, diff, allowed = agree(got, expected, dtype, order=order(op))
            if ok:
                return "", ""
            return name, f"differs from {name} by {diff:.3g} (allowed {allowed:.3g})"
    return "", ""


def order(op: str) -> int:
    """The order of derivatives `op` computes (second order accumulates more rounding)."""
    return 1 if op in ("jacobian", "divergence") else 2


def computation_dtypes(modules: Sequence[nn.Module], x: Tensor) -> list[torch.dtype]:
    """The dtypes f computes in, as far as can be seen without running it: x's and its parameters'."""
    dtypes = {x.dtype}
    for module in modules:
        for parameter in module.parameters(recurse=False):
            dtypes.add(parameter.dtype)
    return sorted(dtypes, key=str)


def disagreement_warning(label: str, op: str, fn_name: str, reference: str, why: str) -> str:
    return (f"autojac: the plan's strategy {label} for {op} of {fn_name} {why} on a slice of the batch; serving "
            f"{reference} instead (plans made without tuning are checked once against plain reverse-mode "
            f"autograd)")

