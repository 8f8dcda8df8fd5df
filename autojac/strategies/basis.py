"""Building blocks shared by strategies: Jacobians of a function along a (chunked) basis.

`vjp_basis` gives all rows of a Jacobian by vector-Jacobian products, `jvp_basis` all columns
by Jacobian-vector products, each vectorized with vmap over `chunk` basis vectors at a time.
The basis is built chunk by chunk, so the (n, n) identity never exists unless chunk is None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ..problem import Problem

Fn = Callable[[Tensor], Tensor]


def spans(total: int, chunk: int | None) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(total) in steps of chunk (one span if None)."""
    step = total if chunk is None else chunk
    for start in range(0, total, max(step, 1)):
        yield start, min(start + step, total)


def one_hot_rows(start: int, stop: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Basis vectors e_start .. e_{stop-1} of a space of `shape`: (stop - start, *shape)."""
    rows = torch.zeros(stop - start, math.prod(shape), dtype=like.dtype, device=like.device)
    index = torch.arange(stop - start, device=like.device)
    rows[index, index + start] = 1
    return rows.view(stop - start, *shape)


def vjp_basis(fn: Fn, primal: Tensor, chunk: int | None) -> Tensor:
    """Jacobian of fn at primal by reverse mode: (*fn(primal).shape, *primal.shape)."""
    out, pullback = vjp(fn, primal)
    if out.numel() == 0:
        return primal.new_zeros(*out.shape, *primal.shape)
    pieces = [
        vmap(pullback)(one_hot_rows(start, stop, tuple(out.shape), out))[0]
        for start, stop in spans(out.numel(), chunk)
    ]
    return torch.cat(pieces).view(*out.shape, *primal.shape)


def jvp_basis(fn: Fn, primal: Tensor, chunk: int | None, tangent_shape: tuple[int, ...] | None = None) -> Tensor:
    """Jacobian of fn at primal by forward mode: (*fn(primal).shape, *tangent_shape).

    With `tangent_shape` shorter than primal's shape (the per-sample shape), each basis
    vector is broadcast over the leading dimensions of primal: the batch trick.
    """
    shape = tuple(primal.shape) if tangent_shape is None else tangent_shape

    def push(tangent: Tensor) -> Tensor:
        return jvp(fn, (primal,), (tangent.expand_as(primal),))[1]

    pieces = [vmap(push)(one_hot_rows(start, stop, shape, primal)) for start, stop in spans(math.prod(shape), chunk)]
    columns = torch.cat(pieces)  # (k, *out)
    return columns.movedim(0, -1).reshape(*columns.shape[1:], *shape)


def one_sample(f: Fn) -> Fn:
    """f on a single sample: (*in) -> (*out), for vmap over the batch."""

    def f_one(xi: Tensor) -> Tensor:
        return f(xi.unsqueeze(0)).squeeze(0)

    return f_one


def grad_input(problem: Problem) -> Tensor:
    """The tensor to differentiate with respect to, without touching the caller's x.

    With create_graph and an x that requires grad, x itself (so the result stays in its
    graph); otherwise a detached alias that requires grad.
    """
    x = problem.x
    if problem.create_graph and x.requires_grad:
        return x.view_as(x)
    return x.detach().requires_grad_(True)


def batch_first(jac: Tensor, out_dims: int) -> Tensor:
    """(*out, B, *in) -> (B, *out, *in)."""
    return jac.movedim(out_dims, 0)
