"""The rules of the primitive operations: elementwise functions, arithmetic, products, and the
operations that move data around. Composites (normalizations, softmax...) are in composites.py.

Notation in the derivative rules: x the input, y the value, g1 = y'(x), and each entry gives
(value, g1, g2) as functions; second derivatives that vanish are None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .interpreter import Interpreter, Jet
from .maps import Apply, Identity, Linear, MatmulLeft, MatmulRight, Scale
from .order import Order
from .stacks import Unsupported, compact, constant, expanded, lift, zeros
from .table import Example, def_comp, def_deriv, def_rule, defzero, deflinear, named

T = torch.Tensor
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# No derivative

defzero("rounding", named("floor", "ceil", "round", "trunc", "sign", "sgn", "heaviside"),
        examples=lambda x: x * torch.floor(3 * x) + torch.round(x) * torch.sign(x))
defzero("like", named("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                      "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"),
        examples=lambda x: x * torch.ones_like(x) + torch.zeros_like(x) + x.new_ones(x.shape))
defzero("detach", [*named("detach"), T.data.__get__],
        examples=lambda x: x * x.detach() + x.data)


def _same_object(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return func(*args, **kwargs)  # returns its input itself, still traced


def_rule("flags", [T.requires_grad_, T.retain_grad], _same_object, "zero",
         examples=lambda x: torch.sin(x).requires_grad_(x.requires_grad) * 2)


# ---------------------------------------------------------------------------------------------
# Elementwise functions: (value, g', g'')

def _unary(name: str, funcs: Sequence[Any], value: Callable[..., Tensor], first: Callable[..., Any],
           second: Callable[..., Any], examples: Any = None, params: Any = None, ratio: Any = None) -> None:
    def_deriv(name, funcs, value, first, second, params, examples or (lambda x, v=value: v(x)), ratio)


def _g2_zero(x: Tensor, y: Tensor, g1: Any, *p: Any) -> None:
    return None


# The most used rules avoid Python numbers (wrapped anew at each call): constant(c, y) is made once.
_unary("tanh", named("tanh"), torch.tanh, lambda x, y: torch.addcmul(constant(1, y), y, y, value=-1),
       lambda x, y, g1: -2 * y * g1, ratio=lambda x, y: y * constant(-2, y))
_unary("sigmoid", named("sigmoid", "expit"), torch.sigmoid, lambda x, y: torch.addcmul(y, y, y, value=-1),
       lambda x, y, g1: g1 * torch.addcmul(constant(1, y), y, constant(-2, y)),
       ratio=lambda x, y: torch.addcmul(constant(1, y), y, constant(-2, y)))
_unary("sin", named("sin"), torch.sin, lambda x, y: torch.cos(x), lambda x, y, g1: -y)
_unary("cos", named("cos"), torch.cos, lambda x, y: -torch.sin(x), lambda x, y, g1: -y)
_unary("tan", named("tan"), torch.tan, lambda x, y: 1 + y * y, lambda x, y, g1: 2 * y * g1,
       examples=lambda x: torch.tan(0.4 * x))
_unary("exp", named("exp"), torch.exp, lambda x, y: y, lambda x, y, g1: y)
_unary("expm1", named("expm1"), torch.expm1, lambda x, y: y + 1, lambda x, y, g1: g1)
_unary("exp2", named("exp2"), torch.exp2, lambda x, y: y * math.log(2), lambda x, y, g1: g1 * math.log(2))
_unary("log", named("log"), torch.log, lambda x, y: 1 / x, lambda x, y, g1: -g1 * g1,
       examples=lambda x: torch.log(x * x + 0.5))
_unary("log1p", named("log1p"), torch.log1p, lambda x, y: 1 / (1 + x), lambda x, y, g1: -g1 * g1,
       examples=lambda x: torch.log1p(x * x))
_unary("log2", named("log2"), torch.log2, lambda x, y: 1 / (x * math.log(2)), lambda x, y, g1: -g1 / x,
       examples=lambda x: torch.log2(x * x + 0.5))
_unary("log10", named("log10"), torch.log10, lambda x, y: 1 / (x * math.log(10)), lambda x, y, g1: -g1 / x,
       examples=lambda x: torch.log10(x * x + 0.5))
_unary("sqrt", named("sqrt"), torch.sqrt, lambda x, y: 0.5 / y, lambda x, y, g1: -g1 * g1 / y,
       examples=lambda x: torch.sqrt(x * x + 0.5))
_unary("rsqrt", named("rsqrt"), torch.rsqrt, lambda x, y: -0.5 * y * y * y, lambda x, y, g1: 0.75 * y ** 5,
       examples=lambda x: torch.rsqrt(x * x + 0.5))
_unary("reciprocal", named("reciprocal"), torch.reciprocal, lambda x, y: -y * y, lambda x, y, g1: 2 * y * y * y,
       examples=lambda x: torch.reciprocal(x * x + 0.5))
_unary("square", named("square"), torch.square, lambda x, y: 2 * x, lambda x, y, g1: 2.0)
_unary("sinh", named("sinh"), torch.sinh, lambda x, y: torch.cosh(x), lambda x, y, g1: y)
_unary("cosh", named("cosh"), torch.cosh, lambda x, y: torch.sinh(x), lambda x, y, g1: y)
_unary("asinh", named("asinh", "arcsinh"), torch.asinh, lambda x, y: torch.rsqrt(1 + x * x),
       lambda x, y, g1: -x * g1 ** 3)
_unary("atan", named("atan", "arctan"), torch.atan, lambda x, y: 1 / (1 + x * x), lambda x, y, g1: -2 * x * g1 * g1)
_unary("asin", named("asin", "arcsin"), torch.asin, lambda x, y: torch.rsqrt(1 - x * x),
       lambda x, y, g1: x * g1 ** 3, examples=lambda x: torch.asin(0.3 * torch.tanh(x)))
_unary("acos", named("acos", "arccos"), torch.acos, lambda x, y: -torch.rsqrt(1 - x * x),
       lambda x, y, g1: x * g1 ** 3, examples=lambda x: torch.acos(0.3 * torch.tanh(x)))
_unary("atanh", named("atanh", "arctanh"), torch.atanh, lambda x, y: 1 / (1 - x * x),
       lambda x, y, g1: 2 * x * g1 * g1, examples=lambda x: torch.atanh(0.3 * torch.tanh(x)))
_unary("erf", named("erf"), torch.erf, lambda x, y: (2 / math.sqrt(math.pi)) * torch.exp(-x * x),
       lambda x, y, g1: -2 * x * g1)
_unary("erfc", named("erfc"), torch.erfc, lambda x, y: (-2 / math.sqrt(math.pi)) * torch.exp(-x * x),
       lambda x, y, g1: -2 * x * g1)
_unary("abs", [*named("abs", "absolute"), T.__abs__], torch.abs, lambda x, y: torch.sign(x), _g2_zero)
_unary("softsign", named("softsign"), F.softsign, lambda x, y: 1 / (1 + x.abs()) ** 2,
       lambda x, y, g1: -2 * torch.sign(x) * g1 / (1 + x.abs()))
_unary("tanhshrink", named("tanhshrink"), F.tanhshrink, lambda x, y: torch.tanh(x) ** 2,
       lambda x, y, g1: 2 * torch.tanh(x) * (1 - g1))
_unary("logsigmoid", [*named("logsigmoid"), torch._C._nn.log_sigmoid], F.logsigmoid,
       lambda x, y: torch.sigmoid(-x), lambda x, y, g1: -g1 * (1 - g1))


def _sigmoid_derivatives(s: Tensor) -> tuple[Tensor, Tensor]:
    first = s * (1 - s)
    return first, first * (1 - 2 * s)


def _silu_first(x: Tensor, y: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_second(x: Tensor, y: Tensor, g1: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    ds, dds = _sigmoid_derivatives(s)
    return 2 * ds + x * dds


def _inplace_flag(input: Tensor, inplace: bool = False) -> tuple[Tensor, tuple, bool]:
    return input, (), inplace


def_deriv("silu", named("silu"), F.silu, _silu_first, _silu_second, _inplace_flag, lambda x: F.silu(x))
def_deriv("relu", named("relu"), torch.relu, lambda x, y: (x > 0).to(x.dtype), _g2_zero, _inplace_flag,
          lambda x: F.relu(x) * x)
def_deriv("relu6", named("relu6"), F.relu6, lambda x, y: ((x > 0) & (x < 6)).to(x.dtype), _g2_zero, _inplace_flag,
          lambda x: F.relu6(4 * x) * x)


def _leaky_params(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> tuple[Tensor, tuple, bool]:
    return input, (negative_slope,), inplace


def_deriv("leaky_relu", named("leaky_relu"), lambda x, slope: F.leaky_relu(x, slope),
          lambda x, y, slope: (x > 0).to(x.dtype) * (1 - slope) + slope, _g2_zero, _leaky_params,
          lambda x: F.leaky_relu(x, 0.3) * x)


def _alpha_params(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> tuple[Tensor, tuple, bool]:
    return input, (alpha,), inplace


def _elu_negative(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    return y + alpha  # alpha exp(x) where x <= 0


def_deriv("elu", named("elu"), lambda x, alpha: F.elu(x, alpha),
          lambda x, y, alpha: torch.where(x > 0, torch.ones_like(x), _elu_negative(x, y, alpha)),
          lambda x, y, g1, alpha: torch.where(x > 0, torch.zeros_like(x), _elu_negative(x, y, alpha)),
          _alpha_params, lambda x: F.elu(x, 0.7))
def_deriv("celu", named("celu"), lambda x, alpha: F.celu(x, alpha),
          lambda x, y, alpha: torch.where(x > 0, torch.ones_like(x), torch.exp(x / alpha)),
          lambda x, y, g1, alpha: torch.where(x > 0, torch.zeros_like(x), torch.exp(x / alpha) / alpha),
          _alpha_params, Example(lambda x: F.celu(x, 0.7), tolerance=1e-7))  # torch's celu' is off by 5e-9

_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805
def_deriv("selu", named("selu"), F.selu,
          lambda x, y: _SELU_SCALE * torch.where(x > 0, torch.ones_like(x), _SELU_ALPHA * torch.exp(x)),
          lambda x, y, g1: torch.where(x > 0, torch.zeros_like(x), g1),
          _inplace_flag, lambda x: F.selu(x))


def _softplus_params(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> tuple[Tensor, tuple, bool]:
    return input, (beta, threshold), False


def _softplus_first(x: Tensor, y: Tensor, beta: float, threshold: float) -> Tensor:
    linear = beta * x > threshold  # where torch's softplus is the identity
    return torch.where(linear, torch.ones_like(x), torch.sigmoid(beta * x))


def _softplus_second(x: Tensor, y: Tensor, g1: Tensor, beta: float, threshold: float) -> Tensor:
    linear = beta * x > threshold
    return torch.where(linear, torch.zeros_like(x), beta * g1 * (1 - g1))


def_deriv("softplus", [*named("softplus"), torch._C._nn.softplus], lambda x, beta, threshold: F.softplus(x, beta, threshold),
          _softplus_first, _softplus_second, _softplus_params,
          [lambda x: F.softplus(x), lambda x: F.softplus(x, beta=2.0, threshold=1.0)])


def _gelu_params(input: Tensor, approximate: str = "none") -> tuple[Tensor, tuple, bool]:
    return input, (approximate,), False


def _gelu_first(x: Tensor, y: Tensor, approximate: str) -> Tensor:
    if approximate == "tanh":
        k = 0.044715
        t = torch.tanh(SQRT_2_OVER_PI * (x + k * x ** 3))
        du = SQRT_2_OVER_PI * (1 + 3 * k * x * x)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) * INV_SQRT_2PI


def _gelu_second(x: Tensor, y: Tensor, g1: Tensor, approximate: str) -> Tensor:
    if approximate == "tanh":
        k = 0.044715
        t = torch.tanh(SQRT_2_OVER_PI * (x + k * x ** 3))
        dt = 1 - t * t
        du, ddu = SQRT_2_OVER_PI * (1 + 3 * k * x * x), SQRT_2_OVER_PI * 6 * k * x
        return dt * du + 0.5 * x * (dt * ddu - 2 * t * dt * du * du)
    return torch.exp(-0.5 * x * x) * INV_SQRT_2PI * (2 - x * x)


def_deriv("gelu", [*named("gelu"), torch._C._nn.gelu], lambda x, approximate: F.gelu(x, approximate=approximate),
          _gelu_first, _gelu_second, _gelu_params,
          [lambda x: F.gelu(x), lambda x: F.gelu(x, approximate="tanh")])


def _hardtanh_params(input: Tensor, min_val: float = -1.0, max_val: float = 1.0,
                     inplace: bool = False) -> tuple[Tensor, tuple, bool]:
    return input, (min_val, max_val), inplace


def_deriv("hardtanh", named("hardtanh"), lambda x, lo, hi: F.hardtanh(x, lo, hi),
          lambda x, y, lo, hi: ((x > lo) & (x < hi)).to(x.dtype), _g2_zero, _hardtanh_params,
          lambda x: F.hardtanh(2 * x) * x)
def_deriv("hardsigmoid", named("hardsigmoid"), F.hardsigmoid,
          lambda x, y: ((x > -3) & (x < 3)).to(x.dtype) / 6, _g2_zero, _inplace_flag,
          Example(lambda x: F.hardsigmoid(4 * x) * x, exact=False))  # torch's hardsigmoid' is off by 5e-9
def_deriv("hardswish", named("hardswish"), F.hardswish,
          lambda x, y: torch.where(x < -3, 0.0, torch.where(x > 3, 1.0, (2 * x + 3) / 6)).to(x.dtype),
          lambda x, y, g1: ((x > -3) & (x < 3)).to(x.dtype) / 3, _inplace_flag,
          lambda x: F.hardswish(4 * x))


def _clamp_params(input: Tensor, min: Any = None, max: Any = None) -> tuple[Tensor, tuple, bool]:
    if isinstance(min, Tensor) or isinstance(max, Tensor):
        raise Unsupported("clamp with tensor bounds")  # handled by the clamp rule below
    return input, (min, max), False


def _clamp_mask(x: Tensor, y: Tensor, lo: Any, hi: Any) -> Tensor:
    inside = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        inside = inside & (x >= lo)
    if hi is not None:
        inside = inside & (x <= hi)
    return inside.to(x.dtype)


def _clamp(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return _clamp_call(ctx, *args, **kwargs)


def _clamp_call(ctx: Interpreter, input: Tensor, min: Any = None, max: Any = None) -> Any:
    if isinstance(min, Tensor) or isinstance(max, Tensor):
        def clamp(x: Tensor, lo: Any, hi: Any) -> Tensor:
            if lo is not None:
                x = torch.maximum(x, lo) if isinstance(lo, Tensor) else x.clamp_min(lo)
            if hi is not None:
                x = torch.minimum(x, hi) if isinstance(hi, Tensor) else x.clamp_max(hi)
            return x
        return ctx.decompose(clamp, input, min, max)
    jet = ctx.jet(input)
    y = torch.clamp(input, min, max)
    if jet is None:
        return y
    return ctx.emit(y, [(jet, Scale(_clamp_mask(input, y, min, max), input.shape, y.shape))])


def_rule("clamp", named("clamp", "clip"), _clamp, "deriv",
         [lambda x: torch.clamp(x, -0.5, 0.7) * x, lambda x: x.clamp(min=-0.2) * x.clip(max=0.3),
          lambda x: torch.clamp(x, x[:, :1] * 0.5, x[:, 1:2] + 1)])
def_rule("clamp_min", named("clamp_min"), lambda ctx, func, args, kwargs: _clamp_call(ctx, args[0], min=args[1]),
         "deriv", lambda x: x.clamp_min(0.1) * x)
def_rule("clamp_max", named("clamp_max"), lambda ctx, func, args, kwargs: _clamp_call(ctx, args[0], max=args[1]),
         "deriv", lambda x: x.clamp_max(0.1) * x)


# ---------------------------------------------------------------------------------------------
# Arithmetic

def _jet(ctx: Interpreter, value: Any) -> Jet | None:
    return ctx.jet(value) if isinstance(value, Tensor) else None


def _shape(value: Any) -> torch.Size:
    return value.shape if isinstance(value, Tensor) else torch.Size()


def _sum_rule(sign: float) -> Callable[..., Any]:
    """a + alpha b (sign 1) or a - alpha b (sign -1)."""
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["other"])
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        y = func(*args, **kwargs)
        links = []
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


def _rsub(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # x.__rsub__(other) and torch.rsub(x, other, alpha): other - alpha * x
    x, other = args[0], args[1] if len(args) > 1 else kwargs["other"]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    y = func(*args, **kwargs)
    links = []
    jx, jo = _jet(ctx, x), _jet(ctx, other)
    if jx is not None:
        links.append((jx, Scale(-alpha, x.shape, y.shape)))
    if jo is not None:
        links.append((jo, Identity(other.shape, y.shape)))
    return ctx.emit(y, links)


def_rule("rsub", named("rsub", "__rsub__"), _rsub, "linear", lambda x: 1 - x)


def _scale_by(number: float) -> Callable[..., Any]:
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else kwargs["input"]
        y = func(*args, **kwargs)
        return ctx.emit(y, [(ctx.jet(x), Scale(number, x.shape, y.shape) if number != 1 else Identity(x.shape, y.shape))])
    return apply


def_rule("neg", named("neg", "negative", "__neg__"), _scale_by(-1.0), "linear", lambda x: -x * 2)
def_rule("pos", named("positive", "__pos__"), _scale_by(1.0), "linear", lambda x: +x * 2)


def _bilinear(ctx: Interpreter, y: Tensor, a: Tensor, b: Tensor, ja: Jet, jb: Jet,
              product: Callable[[Tensor, Tensor], Tensor], map_a: Any, map_b: Any) -> Tensor:
    """y = product(a, b) with both traced: one map per input, and the cross term."""
    ndim = y.dim()

    def curvature(order: Order) -> Tensor:
        return order.cross(product, lift(ja.t, ndim), lift(jb.t, ndim))

    return ctx.emit(y, [(ja, map_a), (jb, map_b)], curvature)


def _mul(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["other"])
    y = func(*args, **kwargs)
    ja, jb = _jet(ctx, a), _jet(ctx, b)
    if ja is not None and jb is not None:
        return _bilinear(ctx, y, a, b, ja, jb, torch.mul, Scale(b, a.shape, y.shape), Scale(a, b.shape, y.shape))
    if ja is not None:
        return ctx.emit(y, [(ja, Scale(b, a.shape, y.shape))])
    return ctx.emit(y, [(jb, Scale(a, b.shape, y.shape))])


def_rule("mul", named("mul", "multiply", "__mul__", "__rmul__"), _mul, "bilinear",
         [lambda x: x * x.flip(-1), lambda x: x * 3.0, lambda x: x * x[:, :1], lambda x: x * x])


def _div(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return _div_call(ctx, func, *args, **kwargs)


def _div_call(ctx: Interpreter, func: Callable[..., Any], input: Any, other: Any, *,
              rounding_mode: str | None = None) -> Any:
    if rounding_mode is not None:  # floor or trunc division: no derivative
        return torch.div(input, other, rounding_mode=rounding_mode)
    if _jet(ctx, other) is not None:
        return ctx.decompose(lambda a, b: a * torch.reciprocal(b), input, other)
    y = torch.div(input, other)
    x_jet = ctx.jet(input)
    factor = 1 / other if not isinstance(other, Tensor) else torch.reciprocal(other)
    return ctx.emit(y, [(x_jet, Scale(factor, input.shape, y.shape))])


def_rule("div", named("div", "divide", "true_divide", "__truediv__", "__div__"), _div, "bilinear",
         [lambda x: x / 3.0, lambda x: x / (x * x + 1), lambda x: torch.div(x, x.flip(-1) ** 2 + 1),
          lambda x: x * torch.div(x, 0.3, rounding_mode="floor")])


def _rdiv(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    x, other = args
    return ctx.decompose(lambda a, b: b * torch.reciprocal(a), x, other)


def_rule("rdiv", named("__rtruediv__", "__rdiv__"), _rdiv, "composite", lambda x: 2 / (x * x + 1))


def _pow(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    base, exponent = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["exponent"])
    if func is T.__rpow__:  # x.__rpow__(other) is other ** x
        base, exponent = exponent, base
    if _jet(ctx, exponent) is not None:  # b ** e = exp(e log b)
        def power(b: Any, e: Tensor) -> Tensor:
            log_b = torch.log(b) if isinstance(b, Tensor) else math.log(b)
            return torch.exp(e * log_b)
        return ctx.decompose(power, base, exponent)
    jet = ctx.jet(base)
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
        return g2 * order.quad(jet.t)

    return ctx.emit(y, [(jet, Scale(g1, base.shape, y.shape))], curvature)


def_rule("pow", named("pow", "__pow__", "__rpow__"), _pow, "deriv",
         [lambda x: x ** 3, lambda x: x ** 2, lambda x: (x * x + 1) ** 0.5, lambda x: torch.pow(x, 1),
          lambda x: 2 ** x, lambda x: (x * x + 1) ** x.flip(-1), lambda x: torch.pow(2.0, x),
          lambda x: x ** torch.tensor(3.0, dtype=x.dtype)])


def _binary_derivatives(name: str, funcs: Sequence[Any], value: Callable[[Tensor, Tensor], Tensor],
                        partials: Callable[[Tensor, Tensor], tuple[Tensor, ...]], examples: Any) -> None:
    """Elementwise y = g(a, b) of two tensors: partials(a, b) gives (g_a, g_b, g_aa, g_ab, g_bb)."""
    def apply(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["other"])
        ja, jb = _jet(ctx, a), _jet(ctx, b)
        a_t = a if isinstance(a, Tensor) else torch.as_tensor(a, dtype=b.dtype, device=b.device)
        b_t = b if isinstance(b, Tensor) else torch.as_tensor(b, dtype=a.dtype, device=a.device)
        y = value(a_t, b_t)
        ga, gb, gaa, gab, gbb = partials(a_t, b_t)
        ndim = y.dim()
        links = []
        if ja is not None:
            links.append((ja, Scale(ga, a_t.shape, y.shape)))
        if jb is not None:
            links.append((jb, Scale(gb, b_t.shape, y.shape)))

        def curvature(order: Order) -> Tensor:
            total = None
            if ja is not None:
                total = gaa * order.quad(lift(ja.t, ndim))
            if jb is not None:
                term = gbb * order.quad(lift(jb.t, ndim))
                total = term if total is None else total + term
            if ja is not None and jb is not None:
                total = total + gab * order.cross(torch.mul, lift(ja.t, ndim), lift(jb.t, ndim))
            return total

        return ctx.emit(y, links, curvature)

    def_rule(name, funcs, apply, "deriv", examples)


def _atan2_partials(a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    r2 = a * a + b * b
    r4 = r2 * r2
    return b / r2, -a / r2, -2 * a * b / r4, (a * a - b * b) / r4, 2 * a * b / r4


_binary_derivatives("atan2", named("atan2", "arctan2"), torch.atan2, _atan2_partials,
                    [lambda x: torch.atan2(x, x.flip(-1) + 2), lambda x: torch.atan2(x, torch.ones_like(x))])


def _selection(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # maximum / minimum: the derivative of the larger (smaller) input; half each where they tie
    a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["other"])
    y = func(*args, **kwargs)
    picked = (y == a).to(y.dtype)
    tie = (a == b).to(y.dtype) * 0.5
    links = []
    ja, jb = _jet(ctx, a), _jet(ctx, b)
    if ja is not None:
        links.append((ja, Scale(picked - tie, a.shape, y.shape)))
    if jb is not None:
        links.append((jb, Scale(1 - picked + tie, b.shape, y.shape)))
    return ctx.emit(y, links)


def_rule("maximum", named("maximum", "minimum", "fmax", "fmin"), _selection, "linear",
         [lambda x: torch.maximum(x, x.flip(-1) * 0.5) * x, lambda x: torch.minimum(x, torch.zeros_like(x)) * x])


def _where(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    if func is T.where:  # x.where(condition, other) is torch.where(condition, x, other)
        condition, a, b = args[1], args[0], args[2] if len(args) > 2 else kwargs["other"]
    else:
        condition, a, b = (*args, *(kwargs[k] for k in ("condition", "input", "other")[len(args):] if k in kwargs))
    y = torch.where(condition, a, b)
    mask = condition.to(y.dtype)
    links = []
    ja, jb = _jet(ctx, a), _jet(ctx, b)
    if ja is not None:
        links.append((ja, Scale(mask, a.shape, y.shape)))
    if jb is not None:
        links.append((jb, Scale(1 - mask, b.shape, y.shape)))
    return ctx.emit(y, links)


def_rule("where", named("where"), _where, "linear",
         [lambda x: torch.where(x > 0, x * x, torch.sin(x)), lambda x: x.where(x < 0.5, 2.0) * x])


def _masked_fill(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    x, mask, value = (*args, *(kwargs[k] for k in ("mask", "value")[len(args) - 1:] if k in kwargs))
    if _jet(ctx, value) is not None:
        raise Unsupported("masked_fill with a traced fill value")
    y = func(*args, **kwargs)
    return ctx.emit(y, [(ctx.jet(x), Scale((~mask).to(y.dtype), x.shape, y.shape))])


def_rule("masked_fill", named("masked_fill"), _masked_fill, "linear",
         lambda x: torch.sin(x).masked_fill(x > 0.3, -1.0) * x)


# ---------------------------------------------------------------------------------------------
# Products

def _matmul(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs.get("other", kwargs.get("mat2")))
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
    return ctx.emit(y, [(ja, map_a)] if ja is not None else [(jb, map_b)])


def_rule("matmul", named("matmul", "mm", "bmm", "__matmul__", "__rmatmul__"), _matmul, "bilinear",
         [Example(lambda x: x.view(-1, 2, 3) @ x.view(-1, 3, 2), (6,)),
          Example(lambda x: torch.bmm(torch.sin(x).view(-1, 2, 3), x.view(-1, 3, 2)), (6,)),
          Example(lambda x: torch.linspace(-1, 1, 8, dtype=x.dtype).view(4, 2) @ x.view(-1, 2, 3), (6,)),
          Example(lambda x: x @ torch.linspace(-1, 1, 6, dtype=x.dtype).view(3, 2), (3,)),
          Example(lambda x: torch.tanh(x @ torch.linspace(-1, 1, 3, dtype=x.dtype)), (3,))])


def _einsum(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
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
    traced = [i for i, jet in enumerate(jets) if jet is not None]

    def with_stacks(stacked: dict[int, Tensor]) -> Tensor:
        eq = ",".join(free + t if i in stacked else t for i, t in enumerate(terms)) + "->" + free + output
        return torch.einsum(eq, *(expanded(stacked[i], operands[i].shape) if i in stacked else op
                                  for i, op in enumerate(operands)))

    links = [(jets[i], Apply(lambda c, i=i: with_stacks({i: c}), operands[i].shape, y.shape, batched=True))
             for i in traced]

    def curvature(order: Order) -> Tensor | None:
        total = None
        for n, i in enumerate(traced):
            for j in traced[n + 1:]:
                term = order.cross(lambda ci, cj, i=i, j=j: with_stacks({i: ci, j: cj}), jets[i].t, jets[j].t)
                total = term if total is None else total + term
        return total

    return ctx.emit(y, links, curvature if len(traced) > 1 else None)


def_rule("einsum", [torch.einsum], _einsum, "bilinear",
         [Example(lambda x: torch.einsum("bij,bjk->bik", x.view(-1, 2, 3), x.view(-1, 3, 2)), (6,)),
          Example(lambda x: torch.einsum("bi,bi->b", x, torch.sin(x)), (3,)),
          Example(lambda x: torch.einsum("...i,ij", x, torch.ones(3, 2, dtype=x.dtype)), (3,)),
          Example(lambda x: torch.einsum("bi,bj,bk->bijk", x, x, x), (2,))])


def _linear(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return _linear_call(ctx, *args, **kwargs)


def _linear_call(ctx: Interpreter, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Any:
    if _jet(ctx, weight) is not None or _jet(ctx, bias) is not None:
        def affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            y = torch.matmul(x, w.mT)
            return y if b is None else y + b
        return ctx.decompose(affine, input, weight, bias)
    y = ctx.reuse("linear", (input, weight, bias), lambda: F.linear(input, weight, bias))
    return ctx.emit(y, [(ctx.jet(input), Linear(weight, input.shape, y.shape))])


def_rule("linear", [F.linear, torch._C._nn.linear], _linear, "linear",
         [lambda x: F.linear(x, torch.linspace(-1, 1, 6, dtype=x.dtype).view(2, 3), torch.ones(2, dtype=x.dtype))])


def _conv(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
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


# ---------------------------------------------------------------------------------------------
# Moving data: linear in the traced input, the same operation on every coefficient

def _negative(dim: int, ndim: int) -> int:
    """A dimension of a value counted from the end, so that it means the same on a stack."""
    return dim - ndim if dim >= 0 else dim


def _dims(dim: Any, ndim: int) -> list[int]:
    if dim is None:
        return list(range(-ndim, 0))
    if isinstance(dim, (list, tuple)):
        return [_negative(d, ndim) for d in dim] if len(dim) else list(range(-ndim, 0))
    return [_negative(dim, ndim)]


def _reshaped(x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    if args and isinstance(args[0], torch.dtype):
        raise Unsupported("view as another dtype")
    shape = y.shape
    return lambda c: c.reshape(c.shape[0], *shape)


deflinear("reshape", named("reshape", "view", "view_as", "reshape_as", "flatten", "unflatten", "squeeze",
                           "unsqueeze", "ravel"), _reshaped,
          examples=[Example(lambda x: x.view(-1, 2, 3).flatten(1) * x, (6,)), lambda x: x.reshape(x.shape[0], 1, -1).squeeze(1),
                    lambda x: x.unsqueeze(-1).unsqueeze(1).ravel().view_as(x)])


def _expanded(x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    shape = y.shape
    return lambda c: expanded(c, shape)


deflinear("expand", named("expand", "expand_as", "broadcast_to"), _expanded,
          examples=lambda x: x[:, None, :].expand(-1, 2, -1) * torch.linspace(0, 1, 2, dtype=x.dtype)[:, None])


def _repeated(x: Tensor, y: Tensor, *sizes: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)) else sizes
    sizes = tuple(kwargs.get("dims", kwargs.get("repeats", sizes)))
    full = (1,) * (x.dim() - len(sizes)) + tuple(sizes)  # tile pads with ones; both may add dimensions
    return lambda c: lift(c, len(full)).repeat(1, *full)


deflinear("repeat", [T.repeat, torch.tile, T.tile], _repeated,
          examples=[lambda x: x.repeat(1, 2) * torch.linspace(0, 1, 6, dtype=x.dtype), lambda x: torch.tile(x, (2,))])


def _permutation(perm: Sequence[int]) -> Callable[[Tensor], Tensor]:
    return lambda c: c.permute(0, *(p + 1 for p in perm))


def _permute_rule(perm_of: Callable[..., list[int]]) -> Callable[..., Callable[[Tensor], Tensor]]:
    def stack_fn(x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
        return _permutation(perm_of(x.dim(), *args, **kwargs))
    return stack_fn


def _perm_permute(ndim: int, *dims: Any) -> list[int]:
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    return [d % ndim for d in dims]


def _perm_transpose(ndim: int, dim0: int, dim1: int) -> list[int]:
    perm = list(range(ndim))
    perm[dim0 % ndim], perm[dim1 % ndim] = perm[dim1 % ndim], perm[dim0 % ndim]
    return perm


def _perm_movedim(ndim: int, source: Any, destination: Any) -> list[int]:
    source = [s % ndim for s in (source if isinstance(source, (list, tuple)) else [source])]
    destination = [d % ndim for d in (destination if isinstance(destination, (list, tuple)) else [destination])]
    order = [d for d in range(ndim) if d not in source]
    for dst, src in sorted(zip(destination, source)):
        order.insert(dst, src)
    return order


def _perm_t(ndim: int) -> list[int]:
    return list(range(ndim))[::-1]


def _perm_mt(ndim: int) -> list[int]:
    return _perm_transpose(ndim, -2, -1)


deflinear("permute", named("permute"), _permute_rule(_perm_permute), batched=True,
          examples=Example(lambda x: x.view(-1, 2, 3).permute(0, 2, 1).reshape(-1, 6) * x, (6,)))
deflinear("transpose", named("transpose", "swapaxes", "swapdims"), _permute_rule(_perm_transpose), batched=True,
          examples=Example(lambda x: x.view(-1, 2, 3).transpose(1, 2).reshape(-1, 6) * x, (6,)))
deflinear("movedim", named("movedim", "moveaxis"), _permute_rule(_perm_movedim), batched=True,
          examples=Example(lambda x: x.view(-1, 2, 3).movedim(1, -1).reshape(-1, 6) * x, (6,)))
deflinear("t", [torch.t, T.t, T.T.__get__], _permute_rule(_perm_t), batched=True,
          examples=lambda x: torch.sin(x.T).t() * x)
deflinear("mT", [T.mT.__get__, T.mH.__get__, T.H.__get__], _permute_rule(_perm_mt), batched=True,
          examples=Example(lambda x: x.view(-1, 2, 3).mT.reshape(-1, 6) * x, (6,)))


def _stack_index(index: Any) -> tuple:
    """x[index] on a value is stack[(slice(None), *index)] on its stacks, unless advanced indices
    are split by a slice (their dimensions would then move to the front, before the stack's)."""
    index = index if isinstance(index, tuple) else (index,)
    advanced = [i for i, item in enumerate(index) if isinstance(item, (Tensor, list))]
    if advanced:
        advanced += [i for i, item in enumerate(index) if isinstance(item, int) and not isinstance(item, bool)]
        advanced.sort()
        if advanced[-1] - advanced[0] + 1 != len(advanced):
            raise Unsupported("indexing with index tensors split by a slice")
    return (slice(None), *index)


def _indexed(x: Tensor, y: Tensor, index: Any) -> Callable[[Tensor], Tensor]:
    full = _stack_index(index)
    return lambda c: c[full]


deflinear("getitem", [T.__getitem__], _indexed,
          examples=[lambda x: x[:, :1] * x[:, 1:2] + x[:, -1:], lambda x: x[..., [2, 0]] * x[:, None, 1],
                    lambda x: x[:, torch.tensor([True, False, True])] ** 2])


def _narrow(x: Tensor, y: Tensor, dim: int, start: Any, length: int) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.narrow(d, start, length)


deflinear("narrow", named("narrow"), _narrow, examples=lambda x: x.narrow(1, 1, 2) * x[:, :2])


def _select(x: Tensor, y: Tensor, dim: int, index: int) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.select(d, index)


deflinear("select", named("select"), _select, examples=lambda x: x.select(1, 2)[:, None] * x)


def _index_select(x: Tensor, y: Tensor, dim: int, index: Tensor) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.index_select(d, index)


deflinear("index_select", named("index_select"), _index_select,
          examples=lambda x: x.index_select(1, torch.tensor([2, 0, 0])) * x)


def _gather(x: Tensor, y: Tensor, dim: int, index: Tensor, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.gather(d, index.expand(c.shape[0], *index.shape))


deflinear("gather", named("gather"), _gather,
          examples=lambda x: x.gather(1, torch.tensor([[2, 0]]).expand(x.shape[0], 2)) * x[:, :2])


def _take_along_dim(x: Tensor, y: Tensor, indices: Tensor, dim: int | None = None) -> Callable[[Tensor], Tensor]:
    if dim is None:
        flat = indices.reshape(-1)
        return lambda c: c.flatten(1).index_select(1, flat)
    d = _negative(dim, x.dim())
    return lambda c: torch.take_along_dim(c, indices.expand(c.shape[0], *indices.shape), d)


deflinear("take_along_dim", named("take_along_dim"), _take_along_dim,
          examples=lambda x: torch.take_along_dim(x, x.detach().argsort(1), 1) * x)


def _roll(x: Tensor, y: Tensor, shifts: Any, dims: Any = None) -> Callable[[Tensor], Tensor]:
    if dims is None:
        return lambda c: c.flatten(1).roll(shifts, 1).view(c.shape)
    return lambda c: c.roll(shifts, _dims(dims, x.dim()))


deflinear("roll", named("roll"), _roll, examples=lambda x: x.roll(1, 1) * x)


def _flip(x: Tensor, y: Tensor, *dims: Any) -> Callable[[Tensor], Tensor]:
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    d = _dims(list(dims), x.dim())
    return lambda c: c.flip(d)


deflinear("flip", named("flip"), _flip, examples=lambda x: x.flip(-1) * x)


def _diagonal(x: Tensor, y: Tensor, offset: int = 0, dim1: int = 0, dim2: int = 1) -> Callable[[Tensor], Tensor]:
    d1, d2 = _negative(dim1, x.dim()), _negative(dim2, x.dim())
    return lambda c: c.diagonal(offset, d1, d2)


deflinear("diagonal", named("diagonal"), _diagonal,
          examples=Example(lambda x: torch.diagonal(x.view(-1, 2, 2), 0, 1, 2) * x[:, :2], (4,)))


def _diag_embed(x: Tensor, y: Tensor, offset: int = 0, dim1: int = -2, dim2: int = -1) -> Callable[[Tensor], Tensor]:
    d1, d2 = _negative(dim1, x.dim() + 1), _negative(dim2, x.dim() + 1)
    return lambda c: torch.diag_embed(c, offset, d1, d2)


deflinear("diag_embed", named("diag_embed"), _diag_embed,
          examples=lambda x: torch.diag_embed(x).flatten(1) * torch.sin(x).repeat(1, 3))


def _triangle(x: Tensor, y: Tensor, diagonal: int = 0, *, name: str) -> Callable[[Tensor], Tensor]:
    op = getattr(torch, name)
    return lambda c: op(c, diagonal)


deflinear("tril", named("tril"), lambda x, y, *a, **k: _triangle(x, y, *a, **k, name="tril"),
          examples=Example(lambda x: x.view(-1, 2, 2).tril().flatten(1) * x, (4,)))
deflinear("triu", named("triu"), lambda x, y, *a, **k: _triangle(x, y, *a, **k, name="triu"),
          examples=Example(lambda x: x.view(-1, 2, 2).triu(1).flatten(1) * x, (4,)))


def _cumsum(x: Tensor, y: Tensor, dim: int, *, dtype: Any = None) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.cumsum(d, dtype=dtype)


deflinear("cumsum", named("cumsum"), _cumsum, examples=lambda x: x.cumsum(1) * x)


def _pad(x: Tensor, y: Tensor, pad: Sequence[int], mode: str = "constant", value: Any = None) -> Callable[[Tensor], Tensor]:
    if mode == "constant":
        return lambda c: F.pad(c, pad)  # the fill value is a constant
    if x.dim() < 2:
        raise Unsupported(f"pad in mode {mode!r} of a 1-d tensor")
    return lambda c: F.pad(c.flatten(0, 1), pad, mode).unflatten(0, c.shape[:2])


deflinear("pad", [F.pad, torch._C._nn.pad], _pad,
          examples=[lambda x: F.pad(x, (1, 2), value=3.0) * torch.linspace(0, 1, 6, dtype=x.dtype),
                    Example(lambda x: F.pad(x.view(-1, 1, 3), (1, 1), mode="reflect").flatten(1) ** 2, (3,))])


def _cast(x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    dtype, device = y.dtype, y.device
    return lambda c: c.to(dtype=dtype, device=device)


deflinear("cast", [*named("to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "clone",
                          "contiguous")], _cast, batched=True,
          examples=lambda x: x.to(x.dtype).clone().contiguous() * x.double().to(x) * x.to("cpu").type(x.type()))


def _reduce(mean: bool) -> Callable[..., Callable[[Tensor], Tensor]]:
    """sum or mean over dimensions: on a compact stack, a dimension it does not vary along is
    scaled by its size (sum) or left (mean) instead of read B times."""
    def stack_fn(x: Tensor, y: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Callable[[Tensor], Tensor]:
        if isinstance(dim, torch.dtype):  # sum(x, dtype) positionally
            dim, dtype = None, dim
        dims = _dims(dim, x.dim())
        shape = x.shape

        def fn(c: Tensor) -> Tensor:
            c = lift(c, len(shape))
            scale, along = 1, []
            for d in dims:
                if c.shape[d] == 1 and shape[d] != 1:
                    scale *= 1 if mean else shape[d]
                else:
                    along.append(d)
            out = (c.mean(along, keepdim=True) if mean else c.sum(along, keepdim=True)) if along else c
            if not keepdim:
                out = out.squeeze(tuple(dims)) if dims else out
            if dtype is not None:
                out = out.to(dtype)
            return out * scale if scale != 1 else out
        return fn
    return stack_fn


deflinear("sum", named("sum"), _reduce(False), batched=True,
          examples=[lambda x: x.sum(-1, keepdim=True) * x, lambda x: torch.sum(x * x, 1),
                    lambda x: x.view(-1, 1, 3).sum((1, 2), keepdim=True)[:, 0] * x])
deflinear("mean", named("mean"), _reduce(True), batched=True,
          examples=[lambda x: x.mean(-1, keepdim=True) * x, lambda x: torch.mean(x * x, dim=(1,))])


def _extremum(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """max/min/amax/amin: the derivative of the extreme entry (one of them where several tie)."""
    x = args[0]
    rest = list(args[1:])
    name = func.__name__
    if rest and isinstance(rest[0], Tensor) or "other" in kwargs:  # torch.max(a, b) is maximum
        return _selection(ctx, func, args, kwargs)
    dim = kwargs.get("dim", rest[0] if rest else None)
    keepdim = kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
    arg = torch.argmax if name in ("max", "amax") else torch.argmin
    jet = ctx.jet(x)
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            raise Unsupported(f"{name} over several dimensions")
        dim = dim[0]
    out = func(*args, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    if dim is None:
        where = arg(x.detach()).reshape(1)
        fn = lambda c: expanded(c, x.shape).flatten(1).index_select(1, where).reshape(c.shape[0], *y.shape)  # noqa: E731
    else:
        d = _negative(dim, x.dim())
        where = arg(x.detach(), dim, keepdim=True)

        def fn(c: Tensor) -> Tensor:
            picked = expanded(c, x.shape).gather(d, where.expand(c.shape[0], *where.shape))
            return picked if keepdim else picked.squeeze(d)
    link = [(jet, Apply(fn, x.shape, y.shape, batched=True))]
    if isinstance(out, tuple):
        ctx.emit_each(out, jet, lambda c: (fn(c), None), [Apply(fn, x.shape, y.shape, batched=True), None])
        return out
    return ctx.emit(y, link)


def_rule("extremum", named("max", "min", "amax", "amin"), _extremum, "linear",
         [lambda x: x.amax(-1, keepdim=True) * x, lambda x: torch.max(x, 1).values[:, None] * x,
          lambda x: x.min(dim=1)[0] * x[:, 0], lambda x: torch.max(x, x.flip(-1)) * x])


def _cat(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict, stack: bool = False) -> Any:
    tensors = list(args[0] if args else kwargs["tensors"])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    y = func(*args, **kwargs)
    d = _negative(dim, y.dim())
    jets = [_jet(ctx, t) for t in tensors]
    op = torch.stack if stack else torch.cat

    def joint(pieces: Sequence[Tensor | None]) -> Tensor:
        count = next(p.shape[0] for p in pieces if p is not None)
        lifted = [lift(p, t.dim()) if p is not None else zeros(count, t) for p, t in zip(pieces, tensors)]
        # a dimension (not the joined one) along which every piece is compact stays compact
        keep = [all(p.shape[i + 1] == 1 for p in lifted) for i in range(tensors[0].dim())]
        if not stack:
            keep[d] = False
        shapes = [[1 if keep[i] else size for i, size in enumerate(t.shape)] for t in tensors]
        return op([p.expand(count, *shape) for p, shape in zip(lifted, shapes)], d)

    traced = [i for i, jet in enumerate(jets) if jet is not None]

    def joint_of_links(stacks: Sequence[Tensor | None]) -> Tensor:
        pieces: list[Tensor | None] = [None] * len(tensors)
        for i, stack in zip(traced, stacks):
            pieces[i] = stack
        return joint(pieces)

    links = [(jets[i], Apply(lambda c, i=i: joint([c if j == i else None for j in range(len(tensors))]),
                             tensors[i].shape, y.shape, batched=True)) for i in traced]
    return ctx.emit(y, links, joint=joint_of_links)


def_rule("cat", named("cat", "concat", "concatenate"), _cat, "linear",
         [lambda x: torch.cat([x, x[:, :1] * 2, torch.ones_like(x[:, :1])], 1) * x.repeat(1, 2)[:, :5],
          lambda x: torch.cat((x[:, :1], x[:, 1:]), dim=-1) ** 2])
def_rule("stack", named("stack"), lambda ctx, func, args, kwargs: _cat(ctx, func, args, kwargs, stack=True), "linear",
         lambda x: torch.stack([x, torch.sin(x), torch.zeros_like(x)], 1).flatten(1) * x.repeat(1, 3))


def _pieces(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """split, chunk, unbind: several outputs, each a piece of the input."""
    x = args[0] if args else kwargs["input"]
    out = func(*args, **kwargs)
    jet = ctx.jet(x)
    name = func.__name__
    rest = list(args[1:])
    if name == "unbind":
        dim = kwargs.get("dim", rest[0] if rest else 0)
        d = _negative(dim, x.dim())
        split = lambda c: expanded(c, x.shape).unbind(d)  # noqa: E731
    else:
        size = kwargs.get("split_size_or_sections", kwargs.get("split_size", kwargs.get("chunks", rest[0] if rest else None)))
        dim = kwargs.get("dim", rest[1] if len(rest) > 1 else 0)
        d = _negative(dim, x.dim())
        method = torch.chunk if name == "chunk" else torch.split
        split = lambda c: method(expanded(c, x.shape), size, d)  # noqa: E731

    def parts(c: Tensor) -> list[Tensor]:
        return [compact(p) for p in split(c)]

    maps = [Apply(lambda c, i=i: split(c)[i], x.shape, piece.shape, batched=True) for i, piece in enumerate(out)]
    ctx.emit_each(out, jet, parts, maps)
    return out


def_rule("split", named("split", "chunk", "unbind"), _pieces, "linear",
         [lambda x: x.split(1, 1)[0] * x.split([1, 2], dim=1)[1], lambda x: torch.chunk(x, 3, 1)[2] * x,
          lambda x: x.unbind(1)[1][:, None] * x])


def _setitem(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    target, index, source = args
    jt, js = ctx.jet(target), _jet(ctx, source)
    region = target[index].shape
    full = _stack_index(index)
    func(target, index, source)  # the write itself, as f asked for it

    def written(old: Tensor | None, new: Tensor | None) -> Tensor:
        count = (old if old is not None else new).shape[0]
        out = expanded(old, target.shape).clone() if old is not None else target.new_zeros(count, *target.shape)
        out[full] = expanded(new, region) if new is not None else 0
        return out

    links = []
    if jt is not None:
        links.append((jt, Apply(lambda c: written(c, None), target.shape, target.shape, batched=True)))
    if js is not None:
        links.append((js, Apply(lambda c: written(None, c), _shape(source), target.shape, batched=True)))
    ctx.emit(target, links, joint=lambda stacks: written(*(
        [stacks[0], stacks[1]] if len(links) == 2 else ([stacks[0], None] if jt is not None else [None, stacks[0]]))))
    return None


def_rule("setitem", [T.__setitem__], _setitem, "linear",
         [lambda x: _written(x), lambda x: _written_into_traced(x)])


def _written(x: Tensor) -> Tensor:
    out = torch.zeros(x.shape[0], 4, dtype=x.dtype)
    out[:, 1:] = torch.sin(x)
    out[:, 0] = x[:, 0] * x[:, 1]
    return out * x[:, :1]


def _written_into_traced(x: Tensor) -> Tensor:
    out = x * 2
    out[:, 1] = 0.5
    return out * x


def _dropout(ctx: Interpreter, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return _dropout_call(ctx, func, *args, **kwargs)


def _dropout_call(ctx: Interpreter, func: Callable[..., Any], input: Tensor, p: float = 0.5, training: bool = True,
                  inplace: bool = False) -> Any:
    if training and p > 0:
        raise Unsupported(f"{func.__name__} in training mode (a random mask)")
    y = input.clone()
    return ctx.emit(y, [(ctx.jet(input), Identity(input.shape, y.shape))])


def_rule("dropout", named("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"),
         _dropout, "linear", lambda x: F.dropout(x, 0.3, training=False) * x)

