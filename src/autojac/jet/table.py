"""The rule table and the helpers that fill it, one per family of rules.

`RULES` maps each torch function f may call (torch.tanh, torch.Tensor.tanh, F.tanh...) to its
`Rule`; reading elementwise.py, algebra.py, layout.py and composites.py tells what is covered, and
adding an operation is one entry there. The families:

    defzero       no derivative (rounding, comparisons, *_like factories, detach)
    deflinear     linear in one input: the same operation moves every coefficient (reshapes,
                  indexing, sums, casts...)
    def_deriv     elementwise f(x), from f' and f'' (activations, sin, exp...)
    def_rule      anything else, written out (products, matrix products, einsum, concatenation)
    def_comp      a composite, run again as simpler operations (layer_norm, softmax, var...)

Each rule carries examples (small per-sample functions that exercise it), so that the tests,
parametrized over this table, check a rule the moment it is added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .maps import Apply, Scale
from .order import Order
from .stacks import Unsupported

if TYPE_CHECKING:
    from .interpreter import Interpreter

Apply_ = Callable[["Interpreter", Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


@dataclass(frozen=True)
class Example:
    """A per-sample function (B, *in_shape) -> (B, ...) that exercises a rule, for the tests.
    `domain` maps a standard normal input into the function's domain; `exact` is False where
    PyTorch's own higher derivatives are wrong, so that the tests compare with finite differences."""

    fn: Callable[[Tensor], Tensor]
    in_shape: tuple[int, ...] = (3,)
    exact: bool = True
    tolerance: float | None = None  # relative, where torch's own first derivative is less accurate


@dataclass(frozen=True)
class Rule:
    name: str
    family: str
    apply: Apply_ = field(repr=False)
    examples: tuple[Example, ...] = field(default=(), repr=False)
    funcs: tuple[Callable[..., Any], ...] = field(default=(), repr=False)


RULES: dict[Any, Rule] = {}
TABLE: dict[str, Rule] = {}  # by name, in the order rules were defined


def named(*names: str) -> list[Callable[..., Any]]:
    """The torch functions of these names that exist: torch.x, torch.Tensor.x, F.x, torch.special.x
    (never torch.linalg.x: its defaults differ)."""
    from torch.nn import functional as F

    found: list[Callable[..., Any]] = []
    for name in names:
        for owner in (torch, torch.Tensor, F, torch.special):
            func = getattr(owner, name, None)
            if func is not None and callable(func) and func not in found:
                found.append(func)
    return found


def getters(*names: str) -> list[Callable[..., Any]]:
    """What a rule is looked up by when these Tensor properties are read (x.T, x.data): their getters."""
    return [getattr(torch.Tensor, name).__get__ for name in names]


def _examples(examples: Example | Callable[[Tensor], Tensor] | Iterable[Any] | None) -> tuple[Example, ...]:
    if examples is None:
        return ()
    if isinstance(examples, Example) or callable(examples):
        examples = [examples]
    return tuple(e if isinstance(e, Example) else Example(e) for e in examples)


def def_rule(name: str, funcs: Iterable[Any], apply: Apply_, family: str = "rule", examples: Any = None) -> Rule:
    """Enter a rule for `funcs`; its name must be new."""
    if name in TABLE:
        raise ValueError(f"a rule called {name!r} exists already")
    funcs = tuple(funcs)
    if not funcs:
        raise ValueError(f"rule {name!r} names no torch function")
    rule = Rule(name, family, apply, _examples(examples), funcs)
    TABLE[name] = rule
    for func in funcs:
        RULES[func] = rule
    return rule


def defzero(name: str, funcs: Iterable[Any], examples: Any = None) -> Rule:
    """Operations whose result carries no derivative: it is computed and left untraced."""
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return func(*args, **kwargs)

    return def_rule(name, funcs, apply, "zero", examples)


def deflinear(name: str, funcs: Iterable[Any], stack_fn: Callable[..., Callable[[Tensor], Tensor]],
              batched: bool = False, examples: Any = None) -> Rule:
    """Operations linear in their first argument (the others are constants: shapes, dimensions,
    indices): `stack_fn(x, y, *args, **kwargs)` gives the function that does to a full stack
    (L, *x.shape) what the operation did to x (y is the result), or, with `batched`, to a
    compact stack."""
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs["input"]
        y = func(*args, **kwargs)
        jet = ctx.jet(x)
        if jet is None or not isinstance(y, Tensor):  # a traced shape or index argument; x.type() names a type
            return y
        rest = args[1:] if args else ()
        fn = stack_fn(x, y, *rest, **{k: v for k, v in kwargs.items() if k != "input"})
        return ctx.emit(y, [(jet, Apply(fn, x.shape, y.shape, batched))])

    return def_rule(name, funcs, apply, "linear", examples)


Derivative = Callable[..., "Tensor | float | None"]


def def_deriv(name: str, funcs: Iterable[Any], value: Callable[..., Tensor], first: Callable[..., Tensor],
              second: Derivative, params: Callable[..., tuple[Tensor, tuple[Any, ...], bool]] | None = None,
              examples: Any = None, ratio: Callable[..., Tensor] | None = None) -> Rule:
    """Elementwise y = g(x): `value(x, *p)` computes y out of place, `first(x, y, *p)` g'(x) and
    `second(x, y, g1, *p)` g''(x) (None where zero). `params(*args, **kwargs)` picks x, the
    parameters p and whether the call was in place from the call's arguments (default: one input).
    Where g'' is cheaply a multiple of g', `ratio(x, y, *p)` = g''/g' lets the second-order stack
    be formed as g' (S + ratio T_a T_b) in two passes instead of three (tanh, sigmoid, exp)."""
    params = params or _one_input

    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, extra, in_place = params(*args, **kwargs)
        jet = ctx.jet(x)
        if jet is None:
            raise Unsupported(f"{name} with a traced parameter")
        def values() -> tuple[Tensor, Tensor]:
            y = value(x, *extra)
            return y, first(x, y, *extra)

        y, g1 = ctx.reuse((name, *extra), (x,), values)
        link = (jet, Scale(g1, x.shape, y.shape) if ctx.tape is not None else None)  # the map is for the tape
        curvature = None
        if ctx.curvatures is not None:  # the op's own second-order term, weighted later by the adjoint
            def curvature(order: Order) -> Tensor | None:
                g2 = ratio(x, y, *extra) * g1 if ratio is not None else second(x, y, g1, *extra)
                return None if g2 is None else g2 * order.quad(jet.tangents())
        if not ctx.forward:
            out = ctx.emit(y, [link], curvature)
        else:
            t = jet.tangents()
            s = None
            if ctx.second:
                assert ctx.order is not None  # (second order is carried only with an order)
                s = _second_stack(ctx.order.quad(t), jet.s, g1, y,
                                  ratio(x, y, *extra) if ratio is not None else None,
                                  second(x, y, g1, *extra) if ratio is None else None)
            out = ctx.emit(y, [link], curvature, stacks=(g1 * t, s))
        return ctx.in_place(x, out, name) if in_place else out

    return def_rule(name, funcs, apply, "deriv", examples)


def _second_stack(quad: Tensor, s: Tensor | None, g1: Tensor, y: Tensor, ratio: Tensor | None,
                  g2: Tensor | float | None) -> Tensor | None:
    """g1 S + g2 quad (or g1 (S + ratio quad)). Without autograd, in place in quad (a fresh tensor)
    where it has the result's shape: one large allocation instead of three."""
    in_place = not torch.is_grad_enabled() and quad.shape[1:] == y.shape
    if ratio is not None:
        if in_place:
            total = quad.mul_(ratio)
            return (total if s is None else total.add_(s)).mul_(g1)
        return g1 * (torch.addcmul(s, ratio, quad) if s is not None else ratio * quad)
    if g2 is None:
        return None if s is None else g1 * s
    if in_place:
        total = quad.mul_(g2)
        return total if s is None else total.addcmul_(g1, s)
    if s is None:
        return g2 * quad
    if isinstance(g2, Tensor):
        return torch.addcmul(g1 * s, g2, quad)
    return torch.add(g1 * s, quad, alpha=g2)  # g2 a number (square's): addcmul takes tensors only


def _one_input(input: Tensor) -> tuple[Tensor, tuple[Any, ...], bool]:
    return input, (), False


def def_comp(name: str, funcs: Iterable[Any], decomposition: Callable[..., Any], examples: Any = None) -> Rule:
    """Composites: the call runs again as `decomposition(*args, **kwargs)`, simpler operations
    that have rules (a fused normalization as means, subtractions and rsqrt: right at every order)."""
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return ctx.decompose(decomposition, *args, **kwargs)

    return def_rule(name, funcs, apply, "composite", examples)


def resolve(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Rule | None, bool]:
    """For a function without an entry: its out-of-place form and that form's rule if it is an
    in-place variant (x.add_(y), x += y, torch.relu_), else (func, None, False)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        plain_name = "__" + name[3:]
    elif name.endswith("_") and not name.endswith("__"):
        plain_name = name[:-1]
    else:
        return func, None, False
    owner = getattr(func, "__objclass__", None)
    if owner is None:
        import sys
        owner = sys.modules.get(getattr(func, "__module__", None) or "torch", torch)
    plain = getattr(owner, plain_name, None)
    if plain is None and owner is not torch:
        plain = getattr(torch, plain_name, None)
    rule = RULES.get(plain)
    return (plain, rule, True) if rule is not None else (func, None, False)
