"""The public operations: check the inputs, get a plan, run it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

from . import calls, config
from .errors import AutojacError, PlanRequiredError
from .models import DERIVATIVES, OPS, Op, Plan
from .planner import default_planner, missing_plan_message
from .problem import BatchedFn, Problem, check_f, check_output, check_v, result_shape
from .signature import FnInfo, Signature, describe, signature
from .strategies.registry import normal_tensor

Quantity = Literal["value", "jacobian", "hessian_diag", "laplacian", "hessian"]
Estimator = Literal["exact", "hutchinson"]
Inputs = Union[Tensor, Sequence[Tensor]]
Dims = Union[Sequence[int], Tensor, None]
QuantityDims = Union[Sequence[int], Tensor, Mapping[str, Sequence[int]], None]


@dataclass(frozen=True)
class Derivatives:
    """What `derivatives` computed; the quantities not asked for are None. Shapes, with in = the
    per-sample input shape (or (k,) with dims of length k):

    value (B, *out); jacobian (B, *out, *in); hessian_diag (B, *out, *in); laplacian (B, *out);
    hessian (B, *out, *in, *in); aux: f's auxiliary output with has_aux=True."""

    value: Tensor | None = None
    jacobian: Tensor | None = None
    hessian_diag: Tensor | None = None
    laplacian: Tensor | None = None
    hessian: Tensor | None = None
    aux: Any = None


def jacobian(f: BatchedFn, x: Inputs, *, args: Sequence[Any] = (), in_dims: Any = None, has_aux: bool = False,
             dims: Dims = None, strategy: str = "auto", create_graph: bool = False,
             batch_independent: bool | None = None, tune: bool | None = None) -> Any:
    """Per-sample Jacobian of f at each sample of x.

    Args:
        f: maps x of shape (B, *in) (and `args`) to a tensor of shape (B, *out); sample b's output
            may depend on other samples only if `batch_independent` is not True.
        x: (B, *in), floating point; or a tuple of inputs (B, *in_i), for f(x_1, x_2, ...).
        args: f's extra positional arguments, f(x, *args), not differentiated.
        in_dims: each argument's batch dimension, torch.vmap's convention over (x, *args); by
            default 0 for tensors whose first dimension is B, None (shared) for the rest.
        has_aux: f returns (output, aux); the result is then (derivative, aux).
        dims: flat indices into *in: differentiate w.r.t. those coordinates only.
        strategy: "auto" (measure once, then reuse the fastest) or a strategy name, e.g.
            "sum_rev" or "sum_rev[chunk=16]", used as is after checking it suits f.
        create_graph: make the result differentiable w.r.t. x and f's parameters.
        batch_independent: None probes f; True/False asserts it.
        tune: None follows AUTOJAC_TUNE (default on); False never benchmarks.

    Returns:
        (B, *out, *in): J[b] = d f(x)[b] / d x[b]; for f returning (B,), (B, *in); with dims of
        length k, (B, *out, k); for a tuple of inputs, a tuple of Jacobians (B, *out, *in_i).
    """
    return _run("jacobian", f, x, None, args, in_dims, has_aux, dims, strategy, create_graph, batch_independent,
                tune)


def hessian(f: BatchedFn, x: Tensor, *, args: Sequence[Any] = (), in_dims: Any = None, has_aux: bool = False,
            dims: Dims = None, strategy: str = "auto", create_graph: bool = False,
            batch_independent: bool | None = None, tune: bool | None = None) -> Any:
    """Per-sample Hessian of each output element of f at each sample of x.

    Args: as for `jacobian` (one input tensor).

    Returns:
        (B, *out, *in, *in): H[b, k] = d^2 f(x)[b, k] / d x[b]^2; for f returning (B,), (B, *in, *in);
        with dims of length k, (B, *out, k, k).
    """
    return _run("hessian", f, x, None, args, in_dims, has_aux, dims, strategy, create_graph, batch_independent,
                tune)


def hvp(f: BatchedFn, x: Tensor, v: Tensor, *, args: Sequence[Any] = (), in_dims: Any = None,
        has_aux: bool = False, dims: Dims = None, strategy: str = "auto", create_graph: bool = False,
        batch_independent: bool | None = None, tune: bool | None = None) -> Any:
    """Per-sample Hessian-vector product of each output element of f, without building a Hessian.

    Args:
        v: (B, *in), x's shape, dtype and device: one direction per sample ((B, k) with dims).
        The others as for `jacobian` (one input tensor).

    Returns:
        (B, *out, *in): Hv[b, k] = H[b, k] @ v[b]; for f returning (B,), (B, *in).
    """
    return _run("hvp", f, x, v, args, in_dims, has_aux, dims, strategy, create_graph, batch_independent, tune)


def hessian_diag(f: BatchedFn, x: Tensor, *, args: Sequence[Any] = (), in_dims: Any = None,
                 has_aux: bool = False, dims: Dims = None, strategy: str = "auto", create_graph: bool = False,
                 batch_independent: bool | None = None, tune: bool | None = None) -> Any:
    """Diagonal of each per-sample Hessian: the pure second derivatives d^2 f[b, k] / d x[b, i]^2.

    Args: as for `jacobian` (one input tensor).

    Returns:
        (B, *out, *in); for f returning (B,), (B, *in); with dims of length k, (B, *out, k).
    """
    return _run("hessian_diag", f, x, None, args, in_dims, has_aux, dims, strategy, create_graph,
                batch_independent, tune)


def laplacian(f: BatchedFn, x: Tensor, *, args: Sequence[Any] = (), in_dims: Any = None, has_aux: bool = False,
              dims: Dims = None, strategy: str = "auto", create_graph: bool = False,
              batch_independent: bool | None = None, tune: bool | None = None) -> Any:
    """Laplacian (trace of the Hessian) of each output element of f at each sample of x; with dims,
    over those coordinates only (the spatial Laplacian of a space-time network, say).

    Args: as for `jacobian` (one input tensor).

    Returns:
        (B, *out): sum_i d^2 f(x)[b, k] / d x[b, i]^2; for f returning (B,), (B,).
    """
    return _run("laplacian", f, x, None, args, in_dims, has_aux, dims, strategy, create_graph, batch_independent,
                tune)


def divergence(f: BatchedFn, x: Tensor, *, args: Sequence[Any] = (), in_dims: Any = None, has_aux: bool = False,
               estimator: Estimator = "exact", samples: int = 1,
               generator: torch.Generator | None = None, strategy: str = "auto", create_graph: bool = False,
               batch_independent: bool | None = None, tune: bool | None = None) -> Any:
    """Divergence of a vector field: the trace of each per-sample Jacobian, for f whose per-sample
    output has x's per-sample shape (a flow's velocity field, say).

    Args:
        estimator: "exact" (default; tuned like every operation) or "hutchinson": the stochastic
            estimate mean_s eps_s^T J[b] eps_s over `samples` Rademacher probes per sample, drawn
            from `generator` (reproducible with one), differentiable, unbiased; never chosen for you,
            since it changes the answer.
        The others as for `jacobian` (one input tensor).

    Returns:
        (B,): sum_i d f(x)[b, i] / d x[b, i].
    """
    if estimator == "hutchinson":
        _check_options(strategy, create_graph, batch_independent, tune, has_aux)
        if strategy != "auto":
            raise ValueError(f"strategy={strategy!r} names a way to compute the exact divergence; the Hutchinson "
                             f"estimate has one way. Leave strategy out, or use estimator='exact'")
        return _hutchinson(f, x, args, in_dims, has_aux, samples, generator, create_graph)
    if estimator != "exact":
        raise ValueError(f"estimator must be 'exact' or 'hutchinson'; got {estimator!r}")
    if samples != 1 or generator is not None:
        given = f"samples={samples!r}" if samples != 1 else "a generator"
        raise ValueError(f"{given} was given, but probes (samples, generator) belong to estimator='hutchinson'; the "
                         f"exact divergence draws none. Pass estimator='hutchinson', or leave them out")
    return _run("divergence", f, x, None, args, in_dims, has_aux, None, strategy, create_graph, batch_independent,
                tune)


def derivatives(f: BatchedFn, x: Tensor, ops: Sequence[Quantity] = ("value", "jacobian", "laplacian"), *,
                args: Sequence[Any] = (), in_dims: Any = None, has_aux: bool = False, dims: QuantityDims = None,
                strategy: str = "auto", create_graph: bool = False, batch_independent: bool | None = None,
                tune: bool | None = None) -> Derivatives:
    """Several derivatives of f at once, with one plan for the set: strategies that compute them
    together share the work (one forward pass, one first backward pass; the structure-aware
    engine carries the value, the Jacobian and the Laplacian in one pass).

    Args:
        ops: any of "value", "jacobian", "hessian_diag", "laplacian", "hessian".
        dims: coordinates for every quantity, as for `jacobian`; or per quantity, e.g.
            {"hessian_diag": [0]}: the Jacobian over every coordinate (u_x, u_t), the second
            derivatives over the ones given (u_xx), as a PINN residual needs them; the quantities
            not named take every coordinate.
        The others as for `jacobian` (one input tensor).

    Returns:
        A `Derivatives` with those fields set (the others None); each derivative over its own
        coordinates.
    """
    want = _checked_quantities(ops)
    found = _run("derivatives", f, x, None, args, in_dims, has_aux, dims, strategy, create_graph, batch_independent,
                 tune, want)
    results, aux = found if has_aux else (found, None)
    return Derivatives(**dict(zip(want, results)), aux=aux)


def explain(f: BatchedFn, x: Inputs, op: Op = "jacobian", *, v: Tensor | None = None, args: Sequence[Any] = (),
            in_dims: Any = None, has_aux: bool = False, dims: Dims = None,
            ops: Sequence[Quantity] = ("value", "jacobian", "laplacian"), create_graph: bool = False,
            batch_independent: bool | None = None, tune: bool | None = None) -> Plan:
    """The plan that `op` ("jacobian", "hessian", "hvp" with its v, "hessian_diag", "laplacian",
    "divergence", or "derivatives" of `ops`) uses for f at a batch shaped like x, making it if
    needed (a batch size within 2x of a tuned one reuses that plan, untimed: `plan.tuned_batch`
    says which). The other arguments as for the operation."""
    return plan_for(op, f, x, v=v, args=args, in_dims=in_dims, has_aux=has_aux, dims=dims, ops=ops,
                    create_graph=create_graph, batch_independent=batch_independent, tune=tune)


def plan_for(op: str, f: BatchedFn, x: Inputs, *, v: Tensor | None = None, args: Sequence[Any] = (),
             in_dims: Any = None, has_aux: bool = False, dims: Dims = None,
             ops: Sequence[str] = ("value", "jacobian", "laplacian"), create_graph: bool = False,
             batch_independent: bool | None = None, tune: bool | None = None, nearby: bool = True) -> Plan:
    """`explain`; with `nearby` False a plan tuned at another batch size is not reused (warming
    makes a plan of its own for every batch size it is given)."""
    want = _checked_quantities(ops) if op == "derivatives" else ()
    with _autograd_available(create_graph):
        call, sig, info = _prepare(op, f, x, v, args, in_dims, has_aux, dims, "auto", create_graph,
                                   batch_independent, tune, want)
        planner = default_planner()
        problem = planner.exact(sig, call.problem)
        if op == "divergence":
            _check_square(planner.probes(sig, problem).out_shape, problem.in_shape)
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


def _run(op: str, f: BatchedFn, x: Any, v: Tensor | None, args: Sequence[Any], in_dims: Any, has_aux: bool,
         dims: QuantityDims, strategy: str, create_graph: bool, batch_independent: bool | None, tune: bool | None,
         want: tuple[str, ...] = ()) -> Any:
    plain = type(args) is tuple and not args and in_dims is None and has_aux is False and dims is None and not want
    glance: tuple[object, ...] | None = None
    if strategy == "auto" and (create_graph is True or create_graph is False) and _peek_transform() is None:
        # The hot path: a plan served to this f for a call that looks the same (an x like this one
        # was checked when the entry was made; f's guards are checked on every call).
        if plain and isinstance(x, Tensor):
            glance = (op, x.shape, x.dtype, x.device, x.layout, create_graph, batch_independent, tune)
            entry = default_planner().serve(f, glance)
            if entry is not None:
                if v is not None or op == "hvp":
                    _check_direction(op, v, x)
                return entry(Problem(op, f, x, v, create_graph))
        else:  # extras, or a tuple of inputs
            extra = calls.glance(args, in_dims, has_aux, dims, x)
            first = x[0] if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor) else x
            if extra is not None and isinstance(first, Tensor):
                glance = (op, first.shape, first.dtype, first.device, first.layout, create_graph, batch_independent,
                          tune, extra, want)
                entry = default_planner().serve(f, glance)
                if entry is not None:
                    if not torch.is_inference_mode_enabled():
                        return _serve_extras(entry, op, f, x, v, args, in_dims, has_aux, dims, create_graph, want)
                    with _autograd_available(create_graph):  # f's tensor arguments as normal ones, as a first call
                        return _serve_extras(entry, op, f, _normal(x), _normal(v), _normal(tuple(args)), in_dims,
                                             has_aux, dims, create_graph, want)
    with _autograd_available(create_graph):
        return _slow(op, f, x, v, args, in_dims, has_aux, dims, strategy, create_graph, batch_independent, tune,
                     want, glance)


def _serve_extras(entry: Any, op: str, f: BatchedFn, x: Any, v: Tensor | None, args: Sequence[Any], in_dims: Any,
                  has_aux: bool, dims: QuantityDims, create_graph: bool, want: tuple[str, ...]) -> Any:
    """A served plan applied to a call with extras (args, dims, aux, several inputs)."""
    call = calls.reduce(op, f, x, v, create_graph, args=args, in_dims=in_dims, has_aux=has_aux, dims=dims,
                        checked=True, want=want)
    if v is not None or op == "hvp":
        _check_direction(op, call.problem.v, call.problem.x)
    return _finish(call, entry(call.problem))


def _slow(op: str, f: BatchedFn, x: Any, v: Tensor | None, args: Sequence[Any], in_dims: Any, has_aux: bool,
          dims: QuantityDims, strategy: str, create_graph: bool, batch_independent: bool | None, tune: bool | None,
          want: tuple[str, ...], glance: tuple[object, ...] | None) -> Any:
    call, sig, info = _prepare(op, f, x, v, args, in_dims, has_aux, dims, strategy, create_graph, batch_independent,
                               tune, want)
    problem = call.problem
    planner = default_planner()
    if problem.x.numel() == 0:
        return _finish(call, _empty(problem))
    if op == "divergence":
        _check_square(planner.probes(sig, problem).out_shape, problem.in_shape)
    if strategy != "auto":
        chosen, chunk = planner.forced(sig, problem, strategy)
        problem = planner.exact(sig, problem)
        planner.check_forced(sig, problem, chosen, chunk, info)
        _reset(call)
        return _finish(call, chosen(problem, chunk))
    try:
        entry, result = planner.entry(problem, sig, info, tune, glance, owner=f)
    except PlanRequiredError as error:
        if not call.spec and not want:
            raise
        advice = _warm_call(op, x, args, in_dims, has_aux, dims, want, create_graph)
        raise PlanRequiredError(missing_plan_message(error.sig, error.store, advice)) from None
    if result is None or call.aux is not None:  # aux must come from the answer's own forward pass
        _reset(call)
        result = entry(problem)
    return _finish(call, result)


def _warm_call(op: str, x: Any, args: Sequence[Any], in_dims: Any, has_aux: bool, dims: QuantityDims,
               want: tuple[str, ...], create_graph: bool) -> str:
    """The autojac.warm call that makes the plan of this call (extras included), as text."""
    def text(value: Any) -> str:
        if isinstance(value, Tensor):
            return f"<a tensor of shape {tuple(value.shape)}>"
        if isinstance(value, (tuple, list)):
            inner = ", ".join(map(text, value)) + ("," if len(value) == 1 else "")
            return f"({inner})"
        return repr(value)

    parts = [f"ops=({op!r},)"]
    if want:
        parts.append(f"quantities={tuple(want)!r}")
    if dims is not None:
        parts.append("dims=" + (repr({k: list(calls.dims_values(d)) for k, d in dims.items()})
                                if isinstance(dims, Mapping) else repr(list(calls.dims_values(dims)))))
    if args:
        parts.append(f"args={text(tuple(args))}")
    if in_dims is not None:
        parts.append(f"in_dims={in_dims!r}")
    if has_aux:
        parts.append("has_aux=True")
    if create_graph:
        parts.append("create_graph=True")
    return f"autojac.warm(f, x, {', '.join(parts)}) with x {text(x)} (the call's own x and arguments)"


def _reset(call: calls.Call) -> None:
    if call.aux is not None:
        call.aux.reset()


def _finish(call: calls.Call, result: Any) -> Any:
    """The canonical result mapped back to the caller's call (split per input; with f's aux)."""
    result = call.unpack(result)
    if call.aux is None:
        return result
    problem = call.problem
    return result, call.aux.result(lambda: problem.f(problem.x), problem.create_graph)


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


def _normal(value: Any) -> Any:
    """Inference tensors as normal ones (autograd cannot use them); anything else as it is."""
    if isinstance(value, (tuple, list)):
        return type(value)(normal_tensor(v) for v in value)
    return normal_tensor(value)


def _prepare(op: str, f: BatchedFn, x: Any, v: Tensor | None, args: Sequence[Any], in_dims: Any, has_aux: bool,
             dims: QuantityDims, strategy: str, create_graph: bool, batch_independent: bool | None, tune: bool | None,
             want: tuple[str, ...]) -> tuple[calls.Call, Signature, FnInfo]:
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
    check_f(f)
    _check_options(strategy, create_graph, batch_independent, tune, has_aux)
    if _peek_transform() is not None:
        raise AutojacError(
            "autojac cannot run inside a torch.func transform (vmap, grad, jacrev, jvp, ...): it differentiates "
            "with torch.autograd and times its strategies, which a transform's wrapped tensors do not allow. Call "
            "autojac outside the transform, or use torch.func itself inside it instead (for per-sample Jacobians: "
            "torch.func.vmap(torch.func.jacrev(f_one_sample)))")
    args = _normal(tuple(args)) if isinstance(args, (tuple, list)) else args
    call = calls.reduce(op, f, _normal(x), _normal(v), create_graph, args=args, in_dims=in_dims, has_aux=has_aux,
                        dims=dims, want=want)
    problem = call.problem
    _check_direction(op, problem.v, problem.x)
    info = describe(f)
    asserted = "" if batch_independent is None else f"batch_independent={batch_independent}"
    spec = ";".join(part for part in (call.spec, "ops=" + ",".join(want) if want else "", asserted) if part)
    sig = signature(op, f, problem.x, create_graph=create_graph, batch_independent=batch_independent, call=spec,
                    info=info)
    return call, sig, info


def _check_direction(op: str, v: Tensor | None, x: Tensor) -> None:
    """hvp needs v, with x's shape, dtype and device; the other operations take none."""
    if op == "hvp":
        if v is None:
            raise TypeError("op='hvp' needs v, one direction per sample with x's shape (B, *in); pass v=...")
        check_v(v, x)
    elif v is not None:
        raise ValueError(f"v is used only by op='hvp', not by op={op!r}; leave it out")


def _check_options(strategy: object, create_graph: object, batch_independent: object, tune: object,
                   has_aux: object = False) -> None:
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a string ('auto' or a strategy name); got {type(strategy).__name__}")
    for name, value in (("create_graph", create_graph), ("has_aux", has_aux)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False; got {value!r}")
    for name, value in (("batch_independent", batch_independent), ("tune", tune)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None, True or False; got {value!r}")


def _checked_quantities(ops: Sequence[str]) -> tuple[str, ...]:
    """The quantities asked of `derivatives`, in their canonical order."""
    if isinstance(ops, str):
        raise TypeError(f"ops must be a sequence of quantities, e.g. ({ops!r},); got the string {ops!r}")
    unknown = [op for op in ops if op not in DERIVATIVES]
    if unknown or not ops:
        raise ValueError(f"ops must name some of {', '.join(DERIVATIVES)}; got {list(ops)!r}")
    return tuple(q for q in DERIVATIVES if q in ops)


def _check_square(out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> None:
    if out_shape != in_shape:
        raise ValueError(f"the divergence needs f's per-sample output shape to equal its input's: f maps (B, "
                         f"*{in_shape}) to (B, *{out_shape}). For other outputs use autojac.jacobian")


def _empty(problem: Problem) -> Any:
    """An empty batch or per-sample input: nothing to differentiate, only shapes to get right."""
    with torch.enable_grad() if problem.create_graph else contextlib.nullcontext():  # also under no_grad()
        return _empty_result(problem)


def _empty_result(problem: Problem) -> Any:
    x = problem.x
    y = problem.f(x if problem.create_graph else x.detach())
    out_shape = check_output(y, x)
    # create_graph=True promises a result in the graph of x and of f's parameters, also when empty:
    # an empty slice of y's graph adds exactly zero (no NaN from an infinite entry of y)
    anchor = y.flatten()[:0].sum() if problem.create_graph and y.requires_grad else None

    def zeros(op: str) -> Tensor:
        result = x.new_zeros(result_shape(op, x.shape[0], out_shape, problem.in_shape))
        return result if anchor is None else result + anchor

    if problem.op == "derivatives":
        return tuple(zeros(q) for q in problem.want)
    return zeros(problem.op)


def _hutchinson(f: BatchedFn, x: Tensor, args: Sequence[Any], in_dims: Any, has_aux: bool, samples: int,
                generator: torch.Generator | None, create_graph: bool) -> Any:
    """Hutchinson's estimate of every sample's divergence: (B,), see `divergence`."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive int (probes per sample); got {samples!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    with _autograd_available(create_graph):
        check_f(f)
        _check_options("auto", create_graph, None, None, has_aux)
        call = calls.reduce("divergence", f, _normal(x), None, create_graph, args=_normal(tuple(args)),
                            in_dims=in_dims, has_aux=has_aux)
        problem = call.problem
        if problem.x.numel() == 0:
            return _finish(call, _empty(problem))
        from .strategies.divergence import hutchinson  # the one module that knows how

        with torch.enable_grad():
            result = hutchinson(problem, samples, generator)
        if not create_graph:
            result = result.detach()
        return _finish(call, result)
