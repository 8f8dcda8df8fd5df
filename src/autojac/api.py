"""The public operations: check the inputs, get a plan, run it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from . import config
from .errors import AutojacError
from .models import OPS, Plan
from .planner import default_planner
from .problem import BatchedFn, Problem, check_f, check_output, check_v, check_x, result_shape
from .signature import FnInfo, Signature, describe, signature
from .strategies.registry import normal_tensor


def jacobian(f: BatchedFn, x: Tensor, *, strategy: str = "auto", create_graph: bool = False,
             batch_independent: bool | None = None, tune: bool | None = None) -> Tensor:
    """Per-sample Jacobian of f at each sample of x.

    Args:
        f: maps x of shape (B, *in) to a tensor of shape (B, *out); sample b's output may
            depend on other samples only if `batch_independent` is not True.
        x: (B, *in), floating point.
        strategy: "auto" (measure once, then reuse the fastest) or a strategy name, e.g.
            "sum_rev" or "sum_rev[chunk=16]", used as is after checking it suits f.
        create_graph: make the result differentiable w.r.t. x and f's parameters.
        batch_independent: None probes f; True/False asserts it.
        tune: None follows AUTOJAC_TUNE (default on); False never benchmarks.

    Returns:
        (B, *out, *in): J[b] = d f(x)[b] / d x[b]; for f returning (B,), (B, *in).
    """
    return _compute("jacobian", f, x, None, strategy, create_graph, batch_independent, tune)


def hessian(f: BatchedFn, x: Tensor, *, strategy: str = "auto", create_graph: bool = False,
            batch_independent: bool | None = None, tune: bool | None = None) -> Tensor:
    """Per-sample Hessian of each output element of f at each sample of x.

    Args: as for `jacobian`.

    Returns:
        (B, *out, *in, *in): H[b, k] = d^2 f(x)[b, k] / d x[b]^2; for f returning (B,), (B, *in, *in).
    """
    return _compute("hessian", f, x, None, strategy, create_graph, batch_independent, tune)


def hvp(f: BatchedFn, x: Tensor, v: Tensor, *, strategy: str = "auto", create_graph: bool = False,
        batch_independent: bool | None = None, tune: bool | None = None) -> Tensor:
    """Per-sample Hessian-vector product of each output element of f, without building a Hessian.

    Args:
        v: (B, *in), x's shape, dtype and device: one direction per sample.
        The others as for `jacobian`.

    Returns:
        (B, *out, *in): Hv[b, k] = H[b, k] @ v[b]; for f returning (B,), (B, *in).
    """
    return _compute("hvp", f, x, v, strategy, create_graph, batch_independent, tune)


def hessian_diag(f: BatchedFn, x: Tensor, *, strategy: str = "auto", create_graph: bool = False,
                 batch_independent: bool | None = None, tune: bool | None = None) -> Tensor:
    """Diagonal of each per-sample Hessian: the pure second derivatives d^2 f[b, k] / d x[b, i]^2.

    Args: as for `jacobian`.

    Returns:
        (B, *out, *in); for f returning (B,), (B, *in).
    """
    return _compute("hessian_diag", f, x, None, strategy, create_graph, batch_independent, tune)


def laplacian(f: BatchedFn, x: Tensor, *, strategy: str = "auto", create_graph: bool = False,
              batch_independent: bool | None = None, tune: bool | None = None) -> Tensor:
    """Laplacian (trace of the Hessian) of each output element of f at each sample of x.

    Args: as for `jacobian`.

    Returns:
        (B, *out): sum_i d^2 f(x)[b, k] / d x[b, i]^2; for f returning (B,), (B,).
    """
    return _compute("laplacian", f, x, None, strategy, create_graph, batch_independent, tune)


def explain(f: BatchedFn, x: Tensor, op: str = "jacobian", *, v: Tensor | None = None,
            create_graph: bool = False, batch_independent: bool | None = None,
            tune: bool | None = None) -> Plan:
    """The plan that `op` ("jacobian", "hessian", "hvp" with its v, "hessian_diag" or "laplacian")
    uses for f at a batch shaped like x, making it if needed (a batch size within 2x of a tuned
    one reuses that plan, untimed: `plan.tuned_batch` says which)."""
    return plan_for(op, f, x, v=v, create_graph=create_graph, batch_independent=batch_independent, tune=tune)


def plan_for(op: str, f: BatchedFn, x: Tensor, *, v: Tensor | None = None, create_graph: bool = False,
             batch_independent: bool | None = None, tune: bool | None = None, nearby: bool = True) -> Plan:
    """`explain`; with `nearby` False a plan tuned at another batch size is not reused (warming
    makes a plan of its own for every batch size it is given)."""
    with _autograd_available(create_graph):
        problem, sig, info = _prepare(op, f, _normal(x), _normal(v), "auto", create_graph, batch_independent, tune)
        planner = default_planner()
        tuning = config.tuning_enabled(tune)
        plan = planner.cached(sig, problem)
        if plan is not None and plan.tuned_batch is not None and not nearby:
            plan = None
        if plan is None and nearby:
            plan = planner.nearby(sig, problem)
        if plan is None or (tuning and not plan.tuned):
            plan, _ = planner.plan(sig, problem, tune=tuning, fresh=not nearby)
        return plan


_peek_transform = torch._C._functorch.peek_interpreter_stack


def _compute(op: str, f: BatchedFn, x: Tensor, v: Tensor | None, strategy: str, create_graph: bool,
             batch_independent: bool | None, tune: bool | None) -> Tensor:
    glance = None
    if strategy == "auto" and isinstance(x, Tensor) and (create_graph is True or create_graph is False) \
            and _peek_transform() is None:
        # The hot path: a plan served to this f for a call that looks the same (an x like this one
        # was checked when the entry was made; f's guards are checked on every call).
        glance = (op, x.shape, x.dtype, x.device, x.layout, create_graph, batch_independent, tune)
        entry = default_planner().serve(f, glance)
        if entry is not None:
            if v is not None or op == "hvp":
                _check_direction(op, v, x)
            return entry(Problem(op, f, x, v, create_graph))
    with _autograd_available(create_graph):
        return _slow(op, f, x, v, strategy, create_graph, batch_independent, tune, glance)


def _slow(op: str, f: BatchedFn, x: Tensor, v: Tensor | None, strategy: str, create_graph: bool,
          batch_independent: bool | None, tune: bool | None, glance: tuple | None) -> Tensor:
    problem, sig, info = _prepare(op, f, _normal(x), _normal(v), strategy, create_graph, batch_independent, tune)
    if problem.x.numel() == 0:
        return _empty(problem)
    planner = default_planner()
    if strategy != "auto":
        chosen, chunk = planner.forced(sig, problem, strategy)
        return chosen(problem, chunk)
    entry, result = planner.entry(problem, sig, info, tune, glance)
    return result if result is not None else entry(problem)


@contextlib.contextmanager
def _autograd_available(create_graph: bool) -> Iterator[None]:
    """Planning needs autograd, which torch.inference_mode() switches off: plan with it off (the
    strategies do the same for the calls served afterwards). create_graph=True cannot be honoured
    there and is refused."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    if create_graph is True:
        raise ValueError(
            "create_graph=True cannot be honoured under torch.inference_mode(): tensors made there can never be "
            "part of a graph. Call autojac outside inference_mode (torch.no_grad() is fine), or pass "
            "create_graph=False")
    with torch.inference_mode(False):
        yield


def _normal(value: Tensor | None) -> Tensor | None:
    """An inference tensor as a normal one (autograd cannot use it); anything else as it is."""
    return normal_tensor(value) if torch.is_inference_mode_enabled() is False else value


def _prepare(op: str, f: BatchedFn, x: Tensor | None, v: Tensor | None, strategy: str, create_graph: bool,
             batch_independent: bool | None, tune: bool | None) -> tuple[Problem, Signature, FnInfo]:
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
    check_f(f)
    check_x(x)
    assert isinstance(x, Tensor)
    _check_direction(op, v, x)
    _check_options(strategy, create_graph, batch_independent, tune)
    if _peek_transform() is not None:
        raise AutojacError(
            "autojac cannot run inside a torch.func transform (vmap, grad, jacrev, jvp, ...): it differentiates "
            "with torch.autograd and times its strategies, which a transform's wrapped tensors do not allow. Call "
            "autojac outside the transform, or compute the derivative inside it with torch.func itself (for "
            "per-sample Jacobians: torch.func.vmap(torch.func.jacrev(f_one_sample)))")
    info = describe(f)
    problem = Problem(op, f, x, v, create_graph)
    return problem, signature(op, f, x, create_graph=create_graph, batch_independent=batch_independent,
                              info=info), info


def _check_direction(op: str, v: Tensor | None, x: Tensor) -> None:
    """hvp needs v, with x's shape, dtype and device; the other operations take none."""
    if op == "hvp":
        if v is None:
            raise TypeError("op='hvp' needs v, one direction per sample with x's shape (B, *in); pass v=...")
        check_v(v, x)
    elif v is not None:
        raise ValueError(f"v is used only by op='hvp', not by op={op!r}; leave it out")


def _check_options(strategy: object, create_graph: object, batch_independent: object, tune: object) -> None:
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a string ('auto' or a strategy name); got {type(strategy).__name__}")
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be True or False; got {create_graph!r}")
    for name, value in (("batch_independent", batch_independent), ("tune", tune)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None, True or False; got {value!r}")


def _empty(problem: Problem) -> Tensor:
    """An empty batch or per-sample input: nothing to differentiate, only shapes to get right."""
    x = problem.x
    out_shape = check_output(problem.f(x.detach()), x)
    return x.new_zeros(result_shape(problem.op, x.shape[0], out_shape, problem.in_shape))
