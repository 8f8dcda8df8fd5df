"""How the caller called: extra arguments, several inputs, chosen coordinates, auxiliary outputs.

Every strategy knows one problem: f maps x (B, *in) to (B, *out). A call with more than that is
reduced to it here, and its result is mapped back:

- `args=(...)`: f(x, *args). Arguments with a batch dimension (`in_dims`, torch.vmap's convention
  over (x, *args); by default 0 for tensors whose first dimension is B, None for the rest) are
  sliced per sample by the strategies that run f one sample at a time; the others are shared.
  Their values are not part of the plan's key, only their structure: an ODE time passed this
  way never makes a new plan.
- several inputs `(x, t)`: f(x, t) of their concatenation z (B, n_x + n_t); the Jacobian of z is
  split back into one per input, each (B, *out, *in_i).
- `dims=[...]`: f as a function of the chosen coordinates z = x.flatten(1)[:, dims] (B, k), the
  others held at x's values (passed on as one more per-sample argument): every result has k in
  place of *in, and only those directions are computed.
- `has_aux=True`: f returns (y, aux); aux is taken from the strategy's own forward pass where it
  has one outside torch.func's transforms, else from one more forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .problem import BatchedFn, Problem, check_x

_UNSET = object()
_peek_transform = torch._C._functorch.peek_interpreter_stack
_CHECKING = contextvars.ContextVar("autojac_checking", default=False)


@contextlib.contextmanager
def checking() -> Iterator[None]:
    """autojac's own forward passes of f (a re-check on a copy of x): not the answer's, so no aux
    is caught from them."""
    token = _CHECKING.set(True)
    try:
        yield
    finally:
        _CHECKING.reset(token)


class AuxCatcher:
    """Strips f's auxiliary output, keeping the first one produced after `reset` by a pass over the
    whole batch (not a slice: a strategy may take the batch in blocks, or look at two samples first)
    outside any torch.func transform (inside one it is a wrapped tensor that cannot leave it)."""

    def __init__(self, f: Callable[..., Any], batch: int) -> None:
        self.f = f
        self.batch = batch
        self.value: Any = _UNSET

    def reset(self) -> None:
        self.value = _UNSET

    def __call__(self, *inputs: Any) -> Tensor:
        out = self.f(*inputs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"has_aux=True: f must return a pair (output, aux); it returned {_kind(out)}")
        y, aux = out
        if self.value is _UNSET and _peek_transform() is None and not _CHECKING.get() \
                and inputs and getattr(inputs[0], "shape", (None,))[:1] == (self.batch,):
            self.value = aux
        return y

    def result(self, forward: Callable[[], Any], create_graph: bool) -> Any:
        """The aux caught, or from one more forward pass; detached unless create_graph."""
        if self.value is _UNSET:
            with torch.enable_grad() if create_graph else torch.no_grad():
                forward()
        aux = self.value
        return aux if create_graph else _detached(aux)


def _detached(value: Any) -> Any:
    """value with every tensor in it detached, its containers of the same types (namedtuples,
    OrderedDicts and dataclasses included)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_detached(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        copied = copy.copy(value)  # its type and state (a defaultdict's factory), then its values
        for k, v in value.items():
            copied[k] = _detached(v)
        return copied
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {field.name: _detached(getattr(value, field.name)) for field in dataclasses.fields(value)
                  if field.init}
        return dataclasses.replace(value, **fields)
    return value


def _kind(value: object) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return type(value).__name__


@dataclass
class Call:
    """One call reduced to the canonical problem: `problem` for the strategies, `unpack` for the
    result, `spec` for the key (the call's structure, never its values), `aux` if f has one."""

    problem: Problem
    unpack: Callable[[Any], Any]
    spec: str
    aux: AuxCatcher | None = None
    inputs: tuple[Tensor, ...] = ()  # the caller's inputs, when there were several


def reduce(op: str, f: BatchedFn, x: Tensor | Sequence[Tensor], v: Tensor | None, create_graph: bool, *,
           args: Sequence[Any] = (), in_dims: Any = None, has_aux: bool = False,
           dims: Sequence[int] | Tensor | Mapping[str, Any] | None = None, checked: bool = False,
           want: tuple[str, ...] = ()) -> Call:
    """The canonical problem of a call (see the module docstring); x is checked by check_x.
    `checked`: a call that looks like one checked before (the hot path): no checks again."""
    args = tuple(args) if checked else _checked_args(args)
    several = isinstance(x, (tuple, list)) and any(isinstance(t, Tensor) for t in x)  # else: not a tensor at all
    inputs = tuple(x) if several else (x,)
    if not checked:
        _check_inputs(op, inputs, several)
        if several and dims is not None:
            raise ValueError("dims picks coordinates of one input, but x is a tuple of several: pass the input whose "
                             "coordinates you want as x and the others through args=(...), or leave dims out")
    batch = inputs[0].shape[0]
    dims_of_args = arg_dims(in_dims, args, batch, checked)
    parts: list[str] = []
    catcher = AuxCatcher(f, batch) if has_aux else None
    user = catcher if catcher is not None else f
    extra: tuple[Any, ...] = ()
    extra_dims: tuple[int | None, ...] = ()

    if several:
        shapes = [tuple(t.shape[1:]) for t in inputs]
        sizes = [math.prod(s) for s in shapes]
        z = torch.cat([t.reshape(batch, math.prod(t.shape[1:])) for t in inputs], dim=1)

        def joined(z: Tensor, *rest: Any) -> Tensor:
            pieces = z.split(sizes, dim=1)
            return user(*(p.reshape(p.shape[0], *s) for p, s in zip(pieces, shapes)), *rest)

        base: Callable[..., Tensor] = joined
        parts.append("inputs=" + ",".join(str(s) for s in shapes))
    else:
        z, base = inputs[0], user
        shapes = []

    jacobian_at: tuple[int, ...] | None = None
    second_at: tuple[int, ...] | None = None
    if isinstance(dims, Mapping):
        dims, jacobian_at, second_at = _per_quantity(op, dims, want, math.prod(z.shape[1:]))
    if dims is not None:
        index = _index(dims_values(dims), math.prod(z.shape[1:]), z.device)
        whole, inner = z, base

        listed = index.tolist()
        run = listed == list(range(listed[0], listed[-1] + 1))

        def chosen(w: Tensor, rest_x: Tensor, *rest: Any) -> Tensor:
            flat = rest_x.reshape(rest_x.shape[0], math.prod(rest_x.shape[1:]))
            if run:  # a run of coordinates: a concatenation, which every strategy and the engine follow
                flat = torch.cat([flat[:, : listed[0]], w, flat[:, listed[-1] + 1:]], dim=1)
            else:
                flat = flat.clone()
                flat[:, index] = w
            return inner(flat.view(rest_x.shape), *rest)

        base = chosen
        z = whole.reshape(batch, math.prod(whole.shape[1:]))[:, index]
        extra, extra_dims = (whole,), (0,)
        parts.append("dims=" + ",".join(map(str, index.tolist())) if not checked else "")
        if v is not None and v.shape != z.shape:
            raise ValueError(f"v has shape {tuple(v.shape)}; with dims, v is one direction per sample in the chosen "
                             f"coordinates: shape {tuple(z.shape)} (B, len(dims))")

    if args and not checked:
        parts.append("args=" + ",".join(_arg_text(a, d) for a, d in zip(args, dims_of_args)))
    if has_aux:
        parts.append("aux")
    all_args = (*extra, *args)
    all_dims = (*extra_dims, *dims_of_args)
    bound = base
    f_batch: BatchedFn = (lambda w: bound(w, *all_args)) if all_args else bound
    problem = Problem(op, f_batch, z, v, create_graph, base=base if all_args else None, args=all_args,
                      arg_dims=all_dims, want=want, second_dims=second_at)
    unpack = _splitter(op, shapes) if several else _identity
    if jacobian_at is not None:
        unpack = _columns_of_jacobian(want, jacobian_at)
    if second_at is not None or jacobian_at is not None:
        parts.append(f"jacobian_at={jacobian_at};second_at={second_at}")
    return Call(problem, unpack, ";".join(parts), catcher, inputs if several else ())


QUANTITIES_WITH_DIMS = ("jacobian", "hessian_diag", "laplacian", "hessian")


def _per_quantity(op: str, dims: Mapping[str, Any], want: tuple[str, ...],
                  n: int) -> tuple[list[int] | None, tuple[int, ...] | None, tuple[int, ...] | None]:
    """dims given per quantity ({"hessian_diag": [0]}: the Jacobian over every coordinate, second
    derivatives over space): the coordinates to differentiate w.r.t. (None: all), and where the
    Jacobian's and the second order's coordinates sit among them (None: all of them, in order)."""
    if op != "derivatives":
        raise TypeError(f"dims maps quantities to coordinates only for autojac.derivatives; for {op}, give one "
                        f"sequence of coordinates")
    unknown = [k for k in dims if k not in QUANTITIES_WITH_DIMS]
    if unknown:
        raise ValueError(f"dims names {unknown}; it maps some of {', '.join(QUANTITIES_WITH_DIMS)} to coordinates")
    chosen = {k: tuple(_checked_dims(v, n, torch.device("cpu")).tolist()) for k, v in dims.items()}
    second = {chosen.get(q) for q in ("hessian_diag", "laplacian", "hessian") if q in want}
    if len(second) > 1:
        raise ValueError(f"dims gives the second-order quantities different coordinates ({dims!r}); they share one "
                         f"pass: give them the same, or call derivatives once for each")
    everything = tuple(range(n))
    jacobian = chosen.get("jacobian", everything) if "jacobian" in want else ()
    second_dims = next(iter(second)) if second else ()
    second_dims = everything if second_dims is None else second_dims
    union = list(dict.fromkeys([*jacobian, *second_dims]))
    if not union:
        union = list(everything)
    at = {d: i for i, d in enumerate(union)}
    whole = union == list(everything)
    jacobian_at = tuple(at[d] for d in jacobian) if jacobian and tuple(jacobian) != tuple(union) else None
    second_at = tuple(at[d] for d in second_dims) if second_dims and tuple(second_dims) != tuple(union) else None
    return (None if whole else union), jacobian_at, second_at


def _columns_of_jacobian(want: tuple[str, ...], columns: tuple[int, ...]) -> Callable[[Any], Any]:
    """derivatives' results with the Jacobian cut to its own coordinates."""
    position = want.index("jacobian")
    index = list(columns)

    def unpack(results: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(r[..., index] if i == position else r for i, r in enumerate(results))

    return unpack


def _identity(result: Any) -> Any:
    return result


def _splitter(op: str, shapes: list[tuple[int, ...]]) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """J (B, *out, n_1 + n_2 + ...) -> (J_1 (B, *out, *in_1), J_2, ...)."""
    sizes = [math.prod(s) for s in shapes]

    def split(result: Tensor) -> tuple[Tensor, ...]:
        pieces = result.split(sizes, dim=-1)
        return tuple(p.reshape(*p.shape[:-1], *s) for p, s in zip(pieces, shapes))

    return split


def _checked_args(args: Any) -> tuple[Any, ...]:
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of f's extra positional arguments, f(x, *args); got "
                        f"{type(args).__name__}. For one argument: args=(value,)")
    return tuple(args)


def _check_inputs(op: str, inputs: tuple[Any, ...], several: bool) -> None:
    if several:
        if op != "jacobian":
            raise TypeError(f"x is a {type(inputs).__name__} of inputs, which only autojac.jacobian takes (one "
                            f"Jacobian per input); for {op}, pass one tensor (torch.cat the inputs inside f), or "
                            f"the others through args=")
        if not inputs:
            raise ValueError("x is an empty tuple; pass at least one input tensor")
    for i, t in enumerate(inputs):
        check_x(t, f"x[{i}]" if several else "x")
    first = inputs[0]
    for i, t in enumerate(inputs[1:], start=1):
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"x[{i}] has batch size {t.shape[0]} but x[0] has {first.shape[0]}; every input needs "
                             f"the same batch dimension (B, ...)")
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"x[{i}] is {t.dtype} on {t.device} but x[0] is {first.dtype} on {first.device}; "
                             f"inputs differentiated together must share dtype and device (use .to(x[0]))")


def arg_dims(in_dims: Any, args: tuple[Any, ...], batch: int, checked: bool = False) -> tuple[int | None, ...]:
    """Each extra argument's batch dimension: in_dims (torch.vmap's convention over (x, *args)), or
    by default 0 for tensors whose first dimension is B and None for everything else."""
    if in_dims is None:
        return tuple(0 if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch else None for a in args)
    if checked and isinstance(in_dims, tuple):
        return tuple(None if d is None else d % args[i].dim() for i, d in enumerate(in_dims[1:]))
    if isinstance(in_dims, int):
        in_dims = (in_dims,) * (1 + len(args))
    if not isinstance(in_dims, (tuple, list)) or len(in_dims) != 1 + len(args):
        raise ValueError(f"in_dims must give one entry for x and each of the {len(args)} extra arguments "
                         f"(torch.vmap's convention), e.g. in_dims=(0{', None' * len(args)}); got {in_dims!r}")
    if in_dims[0] != 0:
        raise ValueError(f"in_dims[0] is {in_dims[0]!r}, but x's batch dimension is its first: in_dims[0] must be 0")
    dims = tuple(in_dims[1:])
    for i, (a, d) in enumerate(zip(args, dims)):
        if d is None:
            continue
        if not isinstance(d, int) or isinstance(d, bool):
            raise TypeError(f"in_dims[{i + 1}] must be an int or None; got {d!r}")
        if not isinstance(a, Tensor):
            raise ValueError(f"in_dims[{i + 1}] is {d} but args[{i}] is a {type(a).__name__}, not a tensor: only "
                             f"tensors can have a batch dimension; give None")
        if not -a.dim() <= d < a.dim() or a.shape[d] != batch:
            raise ValueError(f"in_dims[{i + 1}] is {d} but args[{i}] has shape {tuple(a.shape)}: its dimension {d} "
                             f"must be the batch size {batch}")
    return tuple(None if d is None else d % args[i].dim() for i, d in enumerate(dims))


def dims_values(dims: Any) -> tuple[Any, ...]:
    """dims as a tuple: a sequence of ints, or a 1-D integer tensor or array (the ints are checked later)."""
    if isinstance(dims, (Tensor, np.ndarray)):
        integer = (not dims.dtype.is_floating_point and not dims.dtype.is_complex and dims.dtype != torch.bool
                   if isinstance(dims, Tensor) else dims.dtype.kind in "iu")
        if dims.ndim != 1 or not integer:
            raise TypeError(f"dims must be a 1-D sequence of int indices into the flattened per-sample input; got a "
                            f"{dims.ndim}-D {type(dims).__name__} of {dims.dtype}. For one coordinate give [i]")
        return tuple(int(d) for d in dims.tolist())
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
        raise TypeError(f"dims must be a sequence of int indices into the flattened per-sample input; got "
                        f"{type(dims).__name__} {dims!r}. For one coordinate give [i]")
    values = tuple(int(d) if isinstance(d, np.integer) else d for d in dims)
    if not values or not all(isinstance(d, int) and not isinstance(d, bool) for d in values):
        raise TypeError(f"dims must be a non-empty sequence of int indices into the flattened per-sample input; "
                        f"got {dims!r}. For one coordinate give [i]")
    return values


@functools.lru_cache(maxsize=256)
def _index(dims: tuple[Any, ...], n: int, device: torch.device) -> Tensor:
    """The checked index tensor of `dims` (cached: a call's dims are the same call after call)."""
    with torch.inference_mode(False):
        return _checked_dims(dims, n, device)


def _checked_dims(dims: Sequence[int] | Tensor, n: int, device: torch.device) -> Tensor:
    values = dims.tolist() if isinstance(dims, Tensor) else list(dims)
    if not values or not all(isinstance(d, int) and not isinstance(d, bool) for d in values):
        raise TypeError(f"dims must be a non-empty sequence of int indices into the flattened per-sample input; "
                        f"got {dims!r}")
    bad = [d for d in values if not 0 <= d < n]
    if bad:
        raise ValueError(f"dims {bad} are out of range for a per-sample input of {n} elements; valid: 0 to {n - 1}")
    if len(set(values)) != len(values):
        raise ValueError(f"dims {values} repeat a coordinate; each must appear once")
    return torch.tensor(values, dtype=torch.long, device=device)


def _arg_text(a: Any, dim: int | None) -> str:
    """An extra argument's structure for the key: never a tensor's or a float's value."""
    if isinstance(a, Tensor):
        shape = tuple(s for i, s in enumerate(a.shape) if i != dim)
        return f"T{shape}{str(a.dtype).removeprefix('torch.')}@{dim}"
    if isinstance(a, (bool, str, type(None))):
        return repr(a)[:100]
    return type(a).__name__  # a number's value is data: a timestep, an ODE's time


def glance(args: Sequence[Any], in_dims: Any, has_aux: bool, dims: Any, x: Any) -> tuple[Any, ...] | None:
    """What the hot path compares for a call with extras, cheaply: the structure the key holds
    (None where there is nothing hashable to compare: the slow path then runs every call)."""
    try:
        shapes = tuple((a.shape, a.dtype, a.device) if isinstance(a, Tensor) else
                       (type(a), a if isinstance(a, (bool, str, type(None))) else None) for a in args)
        inputs = tuple((t.shape, t.dtype, t.device, t.layout) for t in x) if isinstance(x, (tuple, list)) else None
        chosen = (None if dims is None else tuple(sorted((k, dims_values(v)) for k, v in dims.items()))
                  if isinstance(dims, Mapping) else dims_values(dims))
        key = (shapes, in_dims if not isinstance(in_dims, list) else tuple(in_dims), has_aux, chosen, inputs)
        hash(key)
        return key
    except (TypeError, AttributeError):
        return None
