"""Coefficient stacks: the Taylor coefficients carried beside a value, one per direction.

A value `y` of shape (*s) is carried with stacks of shape (L, *b): L directions (or direction
pairs) first, then dimensions that broadcast to y's: each is either y's size or 1, where 1 means
"the same for every index" (the input's basis vectors are the same for every sample, so the
first layers' tangents are (L, 1, d), not (L, B, d)). Rules that broadcast use stacks as they
are; rules that move dimensions (reshape, indexing) see them expanded (a view) and hand back
what they give, compacted again where it stayed a broadcast.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


class Unsupported(Exception):
    """f does something the engine has no rule for; the message names it."""


def lift(stack: Tensor, ndim: int) -> Tensor:
    """Insert dimensions of size 1 after the first so that the stack carries a value of `ndim` dims."""
    missing = ndim + 1 - stack.dim()
    if missing <= 0:
        return stack
    return stack.reshape(stack.shape[0], *(1,) * missing, *stack.shape[1:])


def expanded(stack: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The stack as a view of shape (L, *shape)."""
    return lift(stack, len(shape)).expand(stack.shape[0], *shape)


def compact(stack: Tensor) -> Tensor:
    """Narrow to size 1 every dimension (but the first) along which the stack does not vary (stride 0)."""
    strides, sizes = stack.stride(), stack.shape
    if all(strides[d] or sizes[d] == 1 for d in range(1, len(sizes))):
        return stack
    index = (slice(None), *(slice(0, 1) if not strides[d] and sizes[d] > 1 else slice(None)
                            for d in range(1, len(sizes))))
    return stack[index]


def reduce_to(adjoint: Tensor, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    """The adjoint of broadcasting a value of `in_shape` to `out_shape`: the adjoint stack
    (M, *b) (b broadcasting to out_shape) summed over the broadcast dimensions; (M, *b') for in_shape.
    A compact dimension of the adjoint stands for out_shape's many equal entries: it is scaled."""
    adjoint = lift(adjoint, len(out_shape))
    lead = len(out_shape) - len(in_shape)
    scale, dims = 1, []
    for d in range(len(out_shape)):
        if d < lead or (in_shape[d - lead] == 1 and out_shape[d] != 1):
            if adjoint.shape[d + 1] == 1:
                scale *= out_shape[d]
            else:
                dims.append(d + 1)
    if dims:
        adjoint = adjoint.sum(dims, keepdim=True)
    if lead:
        adjoint = adjoint.reshape(adjoint.shape[0], *adjoint.shape[lead + 1:])
    return adjoint * scale if scale != 1 else adjoint


def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Sum of two stacks where None stands for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def zeros(count: int, like: Tensor) -> Tensor:
    """A zero stack of `count` directions for a value like `like`, compact in every dimension."""
    return like.new_zeros(count, *(1,) * like.dim())


def constant(value: float, like: Tensor) -> Tensor:
    """The number as a 0-d tensor of like's dtype and device, made once: an operation with a Python
    number wraps it anew at each call, 2-3x the cost of the operation on small tensors."""
    return _constant(float(value), like.dtype, like.device)


@functools.lru_cache(maxsize=256)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=dtype, device=device)
