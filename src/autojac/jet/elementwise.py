"""Rules of elementwise functions (value, y', y'') and of operations without a derivative.

Notation: x the input, y the value, g1 = y'(x); each entry gives (value, g1, g2) as functions of
(x, y) and the call's parameters; second derivatives that vanish are None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .interpreter import Interpreter
from .maps import Scale
from .stacks import constant
from .table import Example, def_deriv, def_rule, defzero, getters, named

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
defzero("detach", [*named("detach"), *getters("data")],
        examples=lambda x: x * x.detach() + x.data)


def _same_object(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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


def _inplace_flag(input: Tensor, inplace: bool = False) -> tuple[Tensor, tuple[Any, ...], bool]:
    return input, (), inplace


def_deriv("silu", named("silu"), F.silu, _silu_first, _silu_second, _inplace_flag, lambda x: F.silu(x))
def_deriv("relu", named("relu"), torch.relu, lambda x, y: (x > 0).to(x.dtype), _g2_zero, _inplace_flag,
          lambda x: F.relu(x) * x)
def_deriv("relu6", named("relu6"), F.relu6, lambda x, y: ((x > 0) & (x < 6)).to(x.dtype), _g2_zero, _inplace_flag,
          lambda x: F.relu6(4 * x) * x)


def _leaky_params(input: Tensor, negative_slope: float = 0.01,
                  inplace: bool = False) -> tuple[Tensor, tuple[Any, ...], bool]:
    return input, (negative_slope,), inplace


def_deriv("leaky_relu", named("leaky_relu"), lambda x, slope: F.leaky_relu(x, slope),
          lambda x, y, slope: (x > 0).to(x.dtype) * (1 - slope) + slope, _g2_zero, _leaky_params,
          lambda x: F.leaky_relu(x, 0.3) * x)


def _alpha_params(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> tuple[Tensor, tuple[Any, ...], bool]:
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


def _softplus_params(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> tuple[Tensor, tuple[Any, ...], bool]:
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


def _gelu_params(input: Tensor, approximate: str = "none") -> tuple[Tensor, tuple[Any, ...], bool]:
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
                     inplace: bool = False) -> tuple[Tensor, tuple[Any, ...], bool]:
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


def _clamp_masks(x: Tensor, lo: Any, hi: Any, lo_traced: bool, hi_traced: bool) -> tuple[Tensor, Any, Any]:
    """Where clamp(x, lo, hi) follows x, lo and hi, as torch differentiates it: x within [lo, hi],
    bounds included; lo where x is below it (and lo < hi); hi where x is above it, or everywhere
    hi < lo. The bounds' masks are None unless asked for (a bound that is traced)."""
    inside = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        inside = inside & (x >= lo)
    if hi is not None:
        inside = inside & (x <= hi)
    below = above = None
    if lo_traced:
        below = (x < lo) & (lo < hi) if hi is not None else x < lo
    if hi_traced:
        above = (x > hi) | (hi < lo) if lo is not None else x > hi
    return inside, below, above


def _clamp(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _clamp_call(ctx, *args, **kwargs)


def _clamp_call(ctx: Interpreter, input: Tensor, min: Any = None, max: Any = None) -> Any:
    jets = [ctx.jet(v) if isinstance(v, Tensor) else None for v in (input, min, max)]
    y = torch.clamp(input, min, max)
    masks = _clamp_masks(input, min, max, jets[1] is not None, jets[2] is not None)
    links = [(jet, Scale(mask.to(y.dtype), value.shape, y.shape))
             for value, jet, mask in zip((input, min, max), jets, masks) if jet is not None]
    return ctx.emit(y, links)


def_rule("clamp", named("clamp", "clip"), _clamp, "deriv",
         [lambda x: torch.clamp(x, -0.5, 0.7) * x, lambda x: x.clamp(min=-0.2) * x.clip(max=0.3),
          lambda x: torch.clamp(x, x[:, :1] * 0.5, x[:, 1:2] + 1),
          lambda x: torch.clamp(x, min=x[:, :1], max=x[:, 1:2].detach() + 0.5) * x])  # x at a traced bound
def_rule("clamp_min", named("clamp_min"), lambda ctx, func, args, kwargs: _clamp_call(ctx, args[0], min=args[1]),
         "deriv", lambda x: x.clamp_min(0.1) * x)
def_rule("clamp_max", named("clamp_max"), lambda ctx, func, args, kwargs: _clamp_call(ctx, args[0], max=args[1]),
         "deriv", lambda x: x.clamp_max(0.1) * x)
