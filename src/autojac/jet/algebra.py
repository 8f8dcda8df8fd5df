"""Rules of arithmetic (sums, products, quotients, powers, selections) and of matrix products,
einsum, linear layers and convolutions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .interpreter import Interpreter, Jet, Link
from .maps import Apply, Identity, Linear, MatmulLeft, MatmulRight, Scale
from .order import Order
from .stacks import Unsupported, add, expanded, lift
from .table import Example, def_rule, named

T = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Arithmetic

def _jet(ctx: Interpreter, value: Any) -> Jet | None:
    return ctx.jet(value) if isinstance(value, Tensor) else None


def _traced(ctx: Interpreter, value: Tensor) -> Jet:
    """The jet of an input that is traced: the call's one tensor that can be (the call touches one)."""
    jet = ctx.jet(value)
    assert jet is not None
    return jet


def _shape(value: Any) -> torch.Size:
    return value.shape if isinstance(value, Tensor) else torch.Size()


def _sum_rule(sign: float) -> Callable[..., Any]:
    """a + alpha b (sign 1) or a - alpha b (sign -1)."""
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["other"])
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        y = func(*args, **kwargs)
        links: list[Link] = []
        ja, jb = _jet(ctx, a), _jet(ctx, b)
        if ja is not None:
            links.append((ja, Identity(a.shape, y.shape)))
        if jb is not None:
            factor = sign * alpha
            links.append((jb, Identity(b.shape, y.shape) if factor == 1 else Scale(factor, b.shape, y.shape)))
        return ctx.emit(y, links)
    return apply


def_rule("add", named("add", "__add__", "__radd__"), _sum_rule(1.0), "linear",
         [lambda x: x + x.flip(-1) + 1, lambda x: torch.add(x, x[:, :1], alpha=2.0), lambda x: 2 + x])
def_rule("sub", named("sub", "subtract", "__sub__"), _sum_rule(-1.0), "linear",
         [lambda x: x - x.flip(-1) - 1, lambda x: torch.sub(x, x[:, :1], alpha=3.0)])


def _rsub(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # x.__rsub__(other) and torch.rsub(x, other, alpha): other - alpha * x
    x, other = args[0], args[1] if len(args) > 1 else kwargs["other"]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    y = func(*args, **kwargs)
    links: list[Link] = []
    jx, jo = _jet(ctx, x), _jet(ctx, other)
    if jx is not None:
        links.append((jx, Scale(-alpha, x.shape, y.shape)))
    if jo is not None:
        links.append((jo, Identity(other.shape, y.shape)))
    return ctx.emit(y, links)


def_rule("rsub", named("rsub", "__rsub__"), _rsub, "linear", lambda x: 1 - x)


def _scale_by(number: float) -> Callable[..., Any]:
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs["input"]
        y = func(*args, **kwargs)
        derivative = Scale(number, x.shape, y.shape) if number != 1 else Identity(x.shape, y.shape)
        return ctx.emit(y, [(_traced(ctx, x), derivative)])
    return apply


def_rule("neg", named("neg", "negative", "__neg__"), _scale_by(-1.0), "linear", lambda x: -x * 2)
def_rule("pos", named("positive", "__pos__"), _scale_by(1.0), "linear", lambda x: +x * 2)


def _bilinear(ctx: Interpreter, y: Tensor, a: Tensor, b: Tensor, ja: Jet, jb: Jet,
              product: Callable[[Tensor, Tensor], Tensor], map_a: Any, map_b: Any) -> Tensor:
    """y = product(a, b) with both traced: one map per input, and the cross term."""
    ndim = y.dim()

    def curvature(order: Order) -> Tensor:
        return order.cross(product, lift(ja.tangents(), ndim), lift(jb.tangents(), ndim))

    return ctx.emit(y, [(ja, map_a), (jb, map_b)], curvature)


def _mul(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["other"])
    y = func(*args, **kwargs)
    ja, jb = _jet(ctx, a), _jet(ctx, b)
    if ja is not None and jb is not None:
        return _bilinear(ctx, y, a, b, ja, jb, torch.mul, Scale(b, a.shape, y.shape), Scale(a, b.shape, y.shape))
    if ja is not None:
        return ctx.emit(y, [(ja, Scale(b, a.shape, y.shape))])
    assert jb is not None  # the call touches a traced tensor
    return ctx.emit(y, [(jb, Scale(a, b.shape, y.shape))])


def_rule("mul", named("mul", "multiply", "__mul__", "__rmul__"), _mul, "bilinear",
         [lambda x: x * x.flip(-1), lambda x: x * 3.0, lambda x: x * x[:, :1], lambda x: x * x])


def _div(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _div_call(ctx, func, *args, **kwargs)


def _div_call(ctx: Interpreter, func: Callable[..., Any], input: Any, other: Any, *,
              rounding_mode: str | None = None) -> Any:
    if rounding_mode is not None:  # floor or trunc division: no derivative
        return torch.div(input, other, rounding_mode=rounding_mode)
    if _jet(ctx, other) is not None:
        return ctx.decompose(lambda a, b: a * torch.reciprocal(b), input, other)
    y = torch.div(input, other)
    x_jet = _traced(ctx, input)
    factor = 1 / other if not isinstance(other, Tensor) else torch.reciprocal(other)
    return ctx.emit(y, [(x_jet, Scale(factor, input.shape, y.shape))])


def_rule("div", named("div", "divide", "true_divide", "__truediv__", "__div__"), _div, "bilinear",
         [lambda x: x / 3.0, lambda x: x / (x * x + 1), lambda x: torch.div(x, x.flip(-1) ** 2 + 1),
          lambda x: x * torch.div(x, 0.3, rounding_mode="floor")])


def _rdiv(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, other = args
    return ctx.decompose(lambda a, b: b * torch.reciprocal(a), x, other)


def_rule("rdiv", named("__rtruediv__", "__rdiv__"), _rdiv, "composite", lambda x: 2 / (x * x + 1))


def _pow(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    base, exponent = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["exponent"])
    if func is T.__rpow__:  # x.__rpow__(other) is other ** x
        base, exponent = exponent, base
    if _jet(ctx, exponent) is not None:  # b ** e = exp(e log b)
        def power(b: Any, e: Tensor) -> Tensor:
            log_b = torch.log(b) if isinstance(b, Tensor) else math.log(b)
            return torch.exp(e * log_b)
        return ctx.decompose(power, base, exponent)
    jet = _traced(ctx, base)
    y = torch.pow(base, exponent)
    if isinstance(exponent, Tensor):
        p: Any = exponent
        g1 = p * torch.pow(base, p - 1)
    else:
        p = exponent
        g1 = p * torch.pow(base, p - 1) if p != 1 else torch.ones_like(base)

    def curvature(order: Order) -> Tensor | None:
        if not isinstance(p, Tensor) and p in (0, 1):
            return None
        g2 = p * (p - 1) * (torch.pow(base, p - 2) if (isinstance(p, Tensor) or p != 2) else 1.0)
        return g2 * order.quad(jet.tangents())

    return ctx.emit(y, [(jet, Scale(g1, base.shape, y.shape))], curvature)


def_rule("pow", named("pow", "__pow__", "__rpow__"), _pow, "deriv",
         [lambda x: x ** 3, lambda x: x ** 2, lambda x: (x * x + 1) ** 0.5, lambda x: torch.pow(x, 1),
          lambda x: 2 ** x, lambda x: (x * x + 1) ** x.flip(-1), lambda x: torch.pow(2.0, x),
          lambda x: x ** torch.tensor(3.0, dtype=x.dtype)])


def _binary_derivatives(name: str, funcs: Sequence[Any], value: Callable[[Tensor, Tensor], Tensor],
                        partials: Callable[[Tensor, Tensor], tuple[Tensor, ...]], examples: Any) -> None:
    """Elementwise y = g(a, b) of two tensors: partials(a, b) gives (g_a, g_b, g_aa, g_ab, g_bb)."""
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["other"])
        ja, jb = _jet(ctx, a), _jet(ctx, b)
        a_t = a if isinstance(a, Tensor) else torch.as_tensor(a, dtype=b.dtype, device=b.device)
        b_t = b if isinstance(b, Tensor) else torch.as_tensor(b, dtype=a.dtype, device=a.device)
        y = value(a_t, b_t)
        ga, gb, gaa, gab, gbb = partials(a_t, b_t)
        ndim = y.dim()
        links: list[Link] = []
        if ja is not None:
            links.append((ja, Scale(ga, a_t.shape, y.shape)))
        if jb is not None:
            links.append((jb, Scale(gb, b_t.shape, y.shape)))

        def curvature(order: Order) -> Tensor | None:
            total: Tensor | None = None
            if ja is not None:
                total = gaa * order.quad(lift(ja.tangents(), ndim))
            if jb is not None:
                total = add(total, gbb * order.quad(lift(jb.tangents(), ndim)))
            if ja is not None and jb is not None:
                total = add(total, gab * order.cross(torch.mul, lift(ja.tangents(), ndim), lift(jb.tangents(), ndim)))
            return total

        return ctx.emit(y, links, curvature)

    def_rule(name, funcs, apply, "deriv", examples)


def _atan2_partials(a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    r2 = a * a + b * b
    r4 = r2 * r2
    return b / r2, -a / r2, -2 * a * b / r4, (a * a - b * b) / r4, 2 * a * b / r4


_binary_derivatives("atan2", named("atan2", "arctan2"), torch.atan2, _atan2_partials,
                    [lambda x: torch.atan2(x, x.flip(-1) + 2), lambda x: torch.atan2(x, torch.ones_like(x))])


def _selection(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # maximum / minimum: the derivative of the larger (smaller) input; half each where they tie
    a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["other"])
    y = func(*args, **kwargs)
    picked = (y == a).to(y.dtype)
    tie = (a == b).to(y.dtype) * 0.5
    links: list[Link] = []
    ja, jb = _jet(ctx, a), _jet(ctx, b)
    if ja is not None:
        links.append((ja, Scale(picked - tie, a.shape, y.shape)))
    if jb is not None:
        links.append((jb, Scale(1 - picked + tie, b.shape, y.shape)))
    return ctx.emit(y, links)


def_rule("maximum", named("maximum", "minimum", "fmax", "fmin"), _selection, "linear",
         [lambda x: torch.maximum(x, x.flip(-1) * 0.5) * x, lambda x: torch.minimum(x, torch.zeros_like(x)) * x])


def _where(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if func is T.where:  # x.where(condition, other) is torch.where(condition, x, other)
        condition, a, b = args[1], args[0], args[2] if len(args) > 2 else kwargs["other"]
    else:
        condition, a, b = (*args, *(kwargs[k] for k in ("condition", "input", "other")[len(args):] if k in kwargs))
    y = torch.where(condition, a, b)
    mask = condition.to(y.dtype)
    links: list[Link] = []
    ja, jb = _jet(ctx, a), _jet(ctx, b)
    if ja is not None:
        links.append((ja, Scale(mask, a.shape, y.shape)))
    if jb is not None:
        links.append((jb, Scale(1 - mask, b.shape, y.shape)))
    return ctx.emit(y, links)


def_rule("where", named("where"), _where, "linear",
         [lambda x: torch.where(x > 0, x * x, torch.sin(x)), lambda x: x.where(x < 0.5, 2.0) * x])


def _masked_fill(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, mask, value = (*args, *(kwargs[k] for k in ("mask", "value")[len(args) - 1:] if k in kwargs))
    if _jet(ctx, value) is not None:
        raise Unsupported("masked_fill with a traced fill value")
    y = func(*args, **kwargs)
    return ctx.emit(y, [(_traced(ctx, x), Scale((~mask).to(y.dtype), x.shape, y.shape))])


def_rule("masked_fill", named("masked_fill"), _masked_fill, "linear",
         lambda x: torch.sin(x).masked_fill(x > 0.3, -1.0) * x)


# ---------------------------------------------------------------------------------------------
# Products

def _matmul(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a: Any = args[0]
    b: Any = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    if func is T.__rmatmul__:
        a, b = b, a
    y = torch.matmul(a, b)
    ja, jb = _jet(ctx, a), _jet(ctx, b)
    if (ja is not None and a.dim() < 2) or (jb is not None and b.dim() < 2):
        raise Unsupported("matmul of a traced 1-d tensor (a per-sample function has a batch dimension)")
    map_a = MatmulRight(b, a.shape, y.shape) if ja is not None else None
    map_b = MatmulLeft(a, b.shape, y.shape) if jb is not None else None
    if ja is not None and jb is not None:
        return _bilinear(ctx, y, a, b, ja, jb, torch.matmul, map_a, map_b)
    if ja is not None:
        return ctx.emit(y, [(ja, map_a)])
    assert jb is not None  # the call touches a traced tensor
    return ctx.emit(y, [(jb, map_b)])


def_rule("matmul", named("matmul", "mm", "bmm", "__matmul__", "__rmatmul__"), _matmul, "bilinear",
         [Example(lambda x: x.view(-1, 2, 3) @ x.view(-1, 3, 2), (6,)),
          Example(lambda x: torch.bmm(torch.sin(x).view(-1, 2, 3), x.view(-1, 3, 2)), (6,)),
          Example(lambda x: torch.linspace(-1, 1, 8, dtype=x.dtype).view(4, 2) @ x.view(-1, 2, 3), (6,)),
          Example(lambda x: x @ torch.linspace(-1, 1, 6, dtype=x.dtype).view(3, 2), (3,)),
          Example(lambda x: torch.tanh(x @ torch.linspace(-1, 1, 3, dtype=x.dtype)), (3,))])


def _einsum(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    equation, operands = args[0], list(args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
    y = torch.einsum(equation, *operands)
    spec = equation.replace(" ", "")
    inputs, _, output = spec.partition("->")
    terms = inputs.split(",")
    if not _:
        letters = [c for c in inputs if c.isalpha()]
        output = ("..." if "..." in inputs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    free = next(c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in spec)
    jets = [_jet(ctx, op) for op in operands]
    traced = [(i, jet) for i, jet in enumerate(jets) if jet is not None]

    def with_stacks(stacked: dict[int, Tensor]) -> Tensor:
        eq = ",".join(free + t if i in stacked else t for i, t in enumerate(terms)) + "->" + free + output
        return torch.einsum(eq, *(expanded(stacked[i], operands[i].shape) if i in stacked else op
                                  for i, op in enumerate(operands)))

    def on_stack(i: int) -> Callable[[Tensor], Tensor]:
        return lambda c: with_stacks({i: c})

    links = [(jet, Apply(on_stack(i), operands[i].shape, y.shape, batched=True)) for i, jet in traced]

    def curvature(order: Order) -> Tensor | None:
        total = None
        for n, (i, ji) in enumerate(traced):
            for j, jj in traced[n + 1:]:
                term = order.cross(lambda ci, cj: with_stacks({i: ci, j: cj}), ji.tangents(), jj.tangents())
                total = term if total is None else total + term
        return total

    return ctx.emit(y, links, curvature if len(traced) > 1 else None)


def_rule("einsum", [torch.einsum], _einsum, "bilinear",
         [Example(lambda x: torch.einsum("bij,bjk->bik", x.view(-1, 2, 3), x.view(-1, 3, 2)), (6,)),
          Example(lambda x: torch.einsum("bi,bi->b", x, torch.sin(x)), (3,)),
          Example(lambda x: torch.einsum("...i,ij", x, torch.ones(3, 2, dtype=x.dtype)), (3,)),
          Example(lambda x: torch.einsum("bi,bj,bk->bijk", x, x, x), (2,))])


def _linear(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _linear_call(ctx, *args, **kwargs)


def _linear_call(ctx: Interpreter, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Any:
    if _jet(ctx, weight) is not None or _jet(ctx, bias) is not None:
        def affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            y = torch.matmul(x, w.mT)
            return y if b is None else y + b
        return ctx.decompose(affine, input, weight, bias)
    y = ctx.reuse("linear", (input, weight, bias), lambda: F.linear(input, weight, bias))
    return ctx.emit(y, [(_traced(ctx, input), Linear(weight, input.shape, y.shape))])


def_rule("linear", [F.linear, torch._C._nn.linear], _linear, "linear",
         [lambda x: F.linear(x, torch.linspace(-1, 1, 6, dtype=x.dtype).view(2, 3), torch.ones(2, dtype=x.dtype))])


def _conv(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    if _jet(ctx, weight) is not None:
        raise Unsupported(f"{func.__name__} with a traced weight")
    y = func(*args, **kwargs)
    jet = ctx.jet(x)
    if jet is None:
        raise Unsupported(f"{func.__name__} with a traced bias")
    rest = dict(kwargs)
    rest.pop("input", None), rest.pop("weight", None), rest.pop("bias", None)
    tail = args[3:]

    def fn(c: Tensor) -> Tensor:
        c = c.expand(c.shape[0], c.shape[1], *x.shape[1:])  # only the batch may stay compact
        out = func(c.flatten(0, 1), weight, None, *tail, **rest)
        return out.unflatten(0, (c.shape[0], c.shape[1]))

    return ctx.emit(y, [(jet, Apply(fn, x.shape, y.shape, batched=True))])


def_rule("conv", named("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d"), _conv, "linear",
         [Example(lambda x: torch.tanh(F.conv1d(x.view(-1, 1, 4), torch.linspace(-1, 1, 6, dtype=x.dtype).view(2, 1, 3),
                                                torch.ones(2, dtype=x.dtype), padding=1)).sum(1), (4,)),
          Example(lambda x: F.conv2d(x.view(-1, 1, 2, 2), torch.linspace(-1, 1, 4, dtype=x.dtype).view(1, 1, 2, 2)).flatten(1)
                  * x[:, :1], (4,))])
