"""Linear maps on coefficient stacks: an operation's derivative with respect to one input.

Forward mode applies a map to the input's stacks; reverse mode applies its transpose to the
output's adjoint stack. `Scale` (elementwise derivatives), `Linear` (nn.Linear) and the matrix
products have explicit transposes; any other map (reshapes, indexing, concatenation...) is
transposed by autograd, by differentiating the map itself, which is linear.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from .stacks import compact, constant, expanded, lift, reduce_to


class Map:
    """A linear map from an input's stacks to the output's; see the module docstring."""

    in_shape: torch.Size
    out_shape: torch.Size

    def __call__(self, stack: Tensor) -> Tensor:
        raise NotImplementedError

    def transpose(self, adjoint: Tensor) -> Tensor:
        """The adjoint stack of the input, (M, *b) for in_shape, from the output's (M, *b)."""
        with torch.enable_grad():
            probe = adjoint.new_zeros(adjoint.shape[0], *self.in_shape).requires_grad_(True)
            out = self.dense(probe)
            (grad,) = torch.autograd.grad(out, probe, expanded(adjoint, tuple(out.shape[1:])),
                                          create_graph=adjoint.requires_grad, allow_unused=True)
        return grad if grad is not None else probe.detach()

    def dense(self, stack: Tensor) -> Tensor:
        """The map of a full stack, every dimension materialized or a view (for transposing)."""
        return self(stack)

    def cost(self) -> int:
        """Multiply-adds per direction and per sample, for choosing where forward and reverse meet."""
        return max(1, int(torch.Size(self.out_shape[1:]).numel()))


class Scale(Map):
    """Multiplication by a tensor (an elementwise derivative) or a number, with broadcasting."""

    def __init__(self, factor: Tensor | float, in_shape: torch.Size, out_shape: torch.Size):
        self.factor, self.in_shape, self.out_shape = factor, in_shape, out_shape

    def __call__(self, stack: Tensor) -> Tensor:
        factor = self.factor
        return lift(stack, len(self.out_shape)) * (factor if isinstance(factor, Tensor) else constant(factor, stack))

    def transpose(self, adjoint: Tensor) -> Tensor:
        return reduce_to(self(adjoint), self.in_shape, self.out_shape)


class Identity(Map):
    """The input itself, broadcast to the output's shape (addition, casts)."""

    def __init__(self, in_shape: torch.Size, out_shape: torch.Size):
        self.in_shape, self.out_shape = in_shape, out_shape

    def __call__(self, stack: Tensor) -> Tensor:
        return lift(stack, len(self.out_shape))

    def transpose(self, adjoint: Tensor) -> Tensor:
        return reduce_to(adjoint, self.in_shape, self.out_shape)


class Cast(Map):
    """A cast to another dtype or device (or a copy): the stack cast alike; its transpose casts the
    adjoint back, so that a part of f computed in float32 has float32 adjoints."""

    def __init__(self, source: Tensor, target: Tensor):
        self.in_shape, self.out_shape = source.shape, target.shape
        self.source, self.target = (source.dtype, source.device), (target.dtype, target.device)

    def __call__(self, stack: Tensor) -> Tensor:
        dtype, device = self.target
        return stack.to(dtype=dtype, device=device)

    def transpose(self, adjoint: Tensor) -> Tensor:
        dtype, device = self.source
        return adjoint.to(dtype=dtype, device=device)


class Linear(Map):
    """x -> x W^T (nn.Linear without its bias): one matrix product over all directions and samples."""

    def __init__(self, weight: Tensor, in_shape: torch.Size, out_shape: torch.Size):
        self.weight, self.in_shape, self.out_shape = weight, in_shape, out_shape

    def __call__(self, stack: Tensor) -> Tensor:
        return F.linear(stack, self.weight)

    def transpose(self, adjoint: Tensor) -> Tensor:
        return adjoint @ self.weight

    def cost(self) -> int:
        return max(1, int(torch.Size(self.out_shape[1:]).numel()) * self.weight.shape[-1])


class MatmulRight(Map):
    """a -> a @ b for a constant b (a traced, at least 2-d)."""

    def __init__(self, other: Tensor, in_shape: torch.Size, out_shape: torch.Size):
        self.other, self.in_shape, self.out_shape = other, in_shape, out_shape

    def __call__(self, stack: Tensor) -> Tensor:
        return torch.matmul(lift(stack, len(self.out_shape)), self.other)

    def transpose(self, adjoint: Tensor) -> Tensor:
        if self.other.dim() == 1:  # (..., k) @ (k,) -> (...)
            grad = adjoint.unsqueeze(-1) * self.other
        else:
            grad = torch.matmul(lift(adjoint, len(self.out_shape)), self.other.mT)
        width = self.in_shape[-1]
        broadcast = (*self.out_shape[:-1], width) if self.other.dim() > 1 else (*self.out_shape, width)
        return reduce_to(grad, self.in_shape, torch.Size(broadcast))

    def cost(self) -> int:
        return max(1, int(torch.Size(self.out_shape[1:]).numel()) * self.in_shape[-1])


class MatmulLeft(Map):
    """b -> a @ b for a constant a (b traced, at least 2-d)."""

    def __init__(self, other: Tensor, in_shape: torch.Size, out_shape: torch.Size):
        self.other, self.in_shape, self.out_shape = other, in_shape, out_shape

    def __call__(self, stack: Tensor) -> Tensor:
        return torch.matmul(self.other, lift(stack, len(self.out_shape)))

    def transpose(self, adjoint: Tensor) -> Tensor:
        if self.other.dim() == 1:  # (k,) @ (..., k, m) -> (..., m)
            grad = self.other.unsqueeze(-1) * adjoint.unsqueeze(-2)
            return reduce_to(grad, self.in_shape, torch.Size((*self.out_shape[:-1], *self.in_shape[-2:])))
        grad = torch.matmul(self.other.mT, lift(adjoint, len(self.out_shape)))
        return reduce_to(grad, self.in_shape, torch.Size((*self.out_shape[:-2], *self.in_shape[-2:])))

    def cost(self) -> int:
        return max(1, int(torch.Size(self.out_shape[1:]).numel()) * self.in_shape[-2])


class Apply(Map):
    """Any other linear map, given as a function of a full stack (L, *in_shape) -> (L, *out_shape)
    (the operation itself with its dimension arguments moved past the stack's first)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], in_shape: torch.Size, out_shape: torch.Size,
                 batched: bool = False):
        self.fn, self.in_shape, self.out_shape = fn, in_shape, out_shape
        self.batched = batched  # fn takes a compact stack as it is

    def __call__(self, stack: Tensor) -> Tensor:
        if self.batched:
            return self.fn(stack)
        return compact(self.fn(expanded(stack, self.in_shape)))

    def dense(self, stack: Tensor) -> Tensor:
        return self.fn(stack)
