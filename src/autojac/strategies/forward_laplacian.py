"""Forward Laplacian: second derivatives of an nn.Sequential of nn.Linear layers and elementwise
activations (the usual physics-informed network) in one forward pass, without nested AD.

Per layer it carries the value h (B, d), the Jacobian J (B, n, d) of h w.r.t. the input and a
second-order quantity S, whose shape depends on the operation:

    laplacian     S (B, d)        sum_i d^2 h / dx_i^2
    hessian_diag  S (B, n, d)     d^2 h / dx_i^2
    hvp           S (B, n, d)     sum_j d^2 h / dx_i dx_j v_j
    hessian       S (B, n, n, d)  d^2 h / dx_i dx_j

A linear layer maps h, J and S by W^T (h also gets the bias); an activation a = s(z) maps
J -> s'(z) J and S -> s''(z) (J x J) + s'(z) S, where J x J is the matching product of first
derivatives (sum_i J_i^2, J_i^2, J_i (J^T v), J_i J_j). Exact to rounding, and plain torch
operations, so the result is differentiable w.r.t. x and the weights (create_graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..problem import Problem, Sizes
from .curvature import OPS_DIAGONAL
from .registry import BATCH_INDEPENDENT, Strategy, register

# (module, z, s(z)) -> (s', s''); each takes its own activation class
Derivatives = Callable[[Any, Tensor, Tensor], tuple[Tensor, Tensor]]


def _sigmoid_like(s: Tensor) -> tuple[Tensor, Tensor]:
    first = s * (1 - s)
    return first, first * (1 - 2 * s)


def _tanh(m: nn.Module, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    first = 1 - a * a
    return first, -2 * a * first


def _sigmoid(m: nn.Module, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return _sigmoid_like(a)


def _silu(m: nn.Module, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(z)
    ds, dds = _sigmoid_like(s)
    return s + z * ds, 2 * ds + z * dds


def _softplus(m: nn.Softplus, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    beta, threshold = m.beta, m.threshold
    ds, _ = _sigmoid_like(torch.sigmoid(beta * z))
    linear = beta * z > threshold  # where torch's softplus is the identity
    first = torch.where(linear, torch.ones_like(z), torch.sigmoid(beta * z))
    return first, torch.where(linear, torch.zeros_like(z), beta * ds)


def _gelu(m: nn.GELU, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    if m.approximate == "tanh":
        c, k = math.sqrt(2 / math.pi), 0.044715
        u = c * (z + k * z ** 3)
        du, ddu = c * (1 + 3 * k * z * z), c * 6 * k * z
        t = torch.tanh(u)
        dt = 1 - t * t
        first = 0.5 * (1 + t) + 0.5 * z * dt * du
        return first, dt * du + 0.5 * z * (dt * ddu - 2 * t * dt * du * du)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cumulative = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return cumulative + z * density, density * (2 - z * z)


def _relu(m: nn.Module, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return (a > 0).to(z.dtype), torch.zeros_like(z)


def _leaky_relu(m: nn.LeakyReLU, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    slope = torch.full_like(z, m.negative_slope)
    return torch.where(z > 0, torch.ones_like(z), slope), torch.zeros_like(z)


def _elu(m: nn.ELU, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    negative = a + m.alpha  # alpha * exp(z) where z <= 0
    first = torch.where(z > 0, torch.ones_like(z), negative)
    return first, torch.where(z > 0, torch.zeros_like(z), negative)


def _identity(m: nn.Module, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ones_like(z), torch.zeros_like(z)


# Exact types only: a subclass may override forward. Each maps (module, z, s(z)) -> (s', s'').
ACTIVATIONS: dict[type[nn.Module], Derivatives] = {
    nn.Tanh: _tanh, nn.Sigmoid: _sigmoid, nn.SiLU: _silu, nn.Softplus: _softplus, nn.GELU: _gelu,
    nn.ReLU: _relu, nn.LeakyReLU: _leaky_relu, nn.ELU: _elu, nn.Identity: _identity,
}


@dataclass
class _Carry:
    h: Tensor  # (B, d)
    jac: Tensor  # (n, d) while the same for every sample, then (B, n, d)
    second: Tensor | None  # S of the module docstring; None while it is zero


def layers_of(f: object) -> tuple[list[nn.Module], str]:
    """The layers of an nn.Sequential of nn.Linear and known activations (nested Sequentials
    flattened), or ([], why f is not one)."""
    if type(f) is not nn.Sequential:
        return [], f"f is a {type(f).__name__}, not an nn.Sequential of nn.Linear and elementwise activations"
    layers: list[nn.Module] = []
    stack: list[nn.Module] = [f]
    while stack:
        module = stack.pop()
        if module._forward_hooks or module._forward_pre_hooks:
            return [], f"its {type(module).__name__} has forward hooks"
        if type(module) is nn.Sequential:
            # Sequential.forward runs every entry, a module used twice included (children() skips repeats)
            stack.extend(reversed([m for m in module._modules.values() if m is not None]))
        elif type(module) is nn.Linear or type(module) in ACTIVATIONS:
            layers.append(module)
        else:
            known = ", ".join(sorted(t.__name__ for t in ACTIVATIONS))
            return [], f"it holds a {type(module).__name__}; known layers: Linear, {known}"
    return layers, ""


def _applies(p: Problem) -> str:
    _, why = layers_of(p.f)
    if why:
        return why
    if p.x.dim() != 2:
        return f"it needs x of shape (B, n), got per-sample shape {p.in_shape}"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks are registered"
    return ""


def _run(p: Problem, chunk: int | None) -> Tensor:
    why = _applies(p)  # a plan names this strategy only for f it applied to; a forced name may not
    if why:
        raise ValueError(f"forward strategies need an nn.Sequential of nn.Linear and activations: {why}")
    layers, _ = layers_of(p.f)
    x = p.x
    carry = _Carry(x, torch.eye(p.n, dtype=x.dtype, device=x.device), None)
    for layer in layers:
        if type(layer) is nn.Linear:
            carry = _linear(carry, layer)
        else:
            carry = _activation(carry, layer, p)
    return _result(p, carry)


def _linear(c: _Carry, layer: nn.Linear) -> _Carry:
    weight_t = layer.weight.t()
    return _Carry(F.linear(c.h, layer.weight, layer.bias), c.jac @ weight_t,
                  None if c.second is None else c.second @ weight_t)


# Dimensions of S between the batch and the units, per operation.
_INNER_DIMS = {"laplacian": 0, "hessian_diag": 1, "hvp": 1, "hessian": 2}


def _activation(c: _Carry, layer: nn.Module, p: Problem) -> _Carry:
    z = c.h
    a = layer(z.clone() if getattr(layer, "inplace", False) else z)  # the derivatives below read z
    first, second = ACTIVATIONS[type(layer)](layer, z, a)  # (B, d) each
    # J x J, shaped like S; from a J shared by every sample it is formed once and broadcast.
    product = _first_products(p, c.jac)
    s2 = second.view(second.shape[0], *(1,) * _INNER_DIMS[p.op], -1)
    new = s2 * product
    if c.second is not None:
        new = new + first.view_as(s2) * c.second
    return _Carry(a, first[:, None, :] * c.jac, new)


def _first_products(p: Problem, jac: Tensor) -> Tensor:
    """The second-order term an activation adds, before its s'': shaped like S (or like S without
    its batch dimension, for a J (n, d) shared by every sample)."""
    if p.op == "laplacian":
        return (jac * jac).sum(-2)
    if p.op == "hessian_diag":
        return jac * jac
    if p.op == "hvp":
        directional = (jac * cast(Tensor, p.v)[:, :, None]).sum(-2)  # J^T v: (B, d)
        return jac * directional[:, None, :]
    return jac.unsqueeze(-2) * jac.unsqueeze(-3)  # hessian: J_i J_j, (B, n, n, d)


def _result(p: Problem, c: _Carry) -> Tensor:
    batch, m = c.h.shape
    if c.second is None:  # no activation: f is affine, its second derivatives vanish
        shape = {"laplacian": (batch, m), "hessian": (batch, m, p.n, p.n)}.get(p.op, (batch, m, p.n))
        return c.h.new_zeros(shape)
    return c.second if p.op == "laplacian" else c.second.movedim(-1, 1)


def _memory(carried: Callable[[int], int], result_tail: Callable[[int], int]) -> Callable[[Sizes, int | None], int]:
    """J costs n forward passes' worth of activations, S `carried(n)` more; the result is kept twice."""
    def estimate(s: Sizes, chunk: int | None) -> int:
        return s.activations * (2 + s.n + carried(s.n)) + 2 * s.tensor(s.batch, s.m, result_tail(s.n))
    return estimate


register(Strategy(
    name="forward_laplacian", ops=OPS_DIAGONAL, run=_run, memory=_memory(lambda n: n, lambda n: n),
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="one forward pass carrying value, Jacobian and Laplacian (or Hessian diagonal) through an "
            "nn.Sequential of Linear and elementwise activations",
))
register(Strategy(
    name="forward_hessian", ops=frozenset({"hessian"}), run=_run, memory=_memory(lambda n: 2 * n * n, lambda n: n * n),
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="one forward pass carrying value, Jacobian and Hessian through an nn.Sequential of Linear and "
            "elementwise activations",
))
register(Strategy(
    name="forward_hvp", ops=frozenset({"hvp"}), run=_run, memory=_memory(lambda n: n, lambda n: n),
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="one forward pass carrying value, Jacobian and Hessian-vector product through an nn.Sequential "
            "of Linear and elementwise activations",
))
