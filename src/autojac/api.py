"""The public operations: check the inputs, get a plan, run it."""

from __future__ import annotations

from torch import Tensor

from . import config
from .models import OPS, Plan
from .planner import default_planner
from .problem import BatchedFn, Problem, check_f, check_output, check_v, check_x, result_shape
from .signature import signature
from .strategies import registry


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
    uses for f at a batch shaped like x, making it if needed."""
    problem, sig = _prepare(op, f, x, v, "auto", create_graph, batch_independent, tune)
    planner = default_planner()
    plan = planner.cached(sig)
    tuning = config.tuning_enabled(tune)
    if plan is None or (tuning and not plan.tuned):
        plan, _ = planner.plan(sig, problem, tune=tuning)
    return plan


def _compute(op: str, f: BatchedFn, x: Tensor, v: Tensor | None, strategy: str, create_graph: bool,
             batch_independent: bool | None, tune: bool | None) -> Tensor:
    planner = default_planner()
    glance = None
    if strategy == "auto" and isinstance(x, Tensor):
        # The hot path: a tuned plan for this f and a call that looks the same (an x like this
        # one was checked when the plan was made; f's identity state is compared on every call).
        _check_options(strategy, create_graph, batch_independent, tune)
        glance = (op, x.shape, x.dtype, x.device, create_graph, batch_independent)
        hit = planner.shortcut(f, glance)
        if hit is not None:
            plan, chosen = hit
            _check_direction(op, v, x)
            return chosen(Problem(op, f, x, v, create_graph), plan.chunk)
    problem, sig = _prepare(op, f, x, v, strategy, create_graph, batch_independent, tune)
    if x.numel() == 0:
        return _empty(problem)
    if strategy != "auto":
        chosen, chunk = planner.forced(sig, problem, strategy)
        return chosen(problem, chunk)
    plan = planner.cached(sig)
    result = None
    if plan is None or (not plan.tuned and config.tuning_enabled(tune)):
        plan, result = planner.plan(sig, problem, tune=config.tuning_enabled(tune))
    if glance is not None:
        planner.remember(f, glance, plan)
    if result is not None:
        return result
    return registry.get(plan.strategy, op)(problem, plan.chunk)


def _prepare(op: str, f: BatchedFn, x: Tensor, v: Tensor | None, strategy: str, create_graph: bool,
             batch_independent: bool | None, tune: bool | None):
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
    check_f(f)
    check_x(x)
    _check_direction(op, v, x)
    _check_options(strategy, create_graph, batch_independent, tune)
    problem = Problem(op, f, x, v, create_graph)
    return problem, signature(op, f, x, create_graph=create_graph, batch_independent=batch_independent)


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
