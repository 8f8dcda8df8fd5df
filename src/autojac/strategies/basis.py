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


def joined(pieces: list[Tensor]) -> Tensor:
    """torch.cat of the pieces of a chunked computation, without copying a single piece (that
    copy cost 30% of vmap_rev on a (512, 64, 512) Jacobian). The result may not be contiguous:
    reshape it, do not view it."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def one_hot_rows(start: int, stop: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Basis vectors e_start .. e_{stop-1} of a space of `shape`: (stop - start, *shape).

    Made in its final shape, not as a view: a view as the seeds of a vectorized backward pass
    costs some 40 µs more per call (measured on the seed problem, where the pass takes 200)."""
    rows = torch.zeros(stop - start, *shape, dtype=like.dtype, device=like.device)
    index = torch.arange(stop - start, device=like.device)
    rows.view(stop - start, -1)[index, index + start] = 1
    return rows


def vjp_basis(fn: Fn, primal: Tensor, chunk: int | None) -> Tensor:
    """Jacobian of fn at primal by reverse mode: (*fn(primal).shape, *primal.shape)."""
    out, pullback = vjp(fn, primal)
    if out.numel() == 0:
        return primal.new_zeros(*out.shape, *primal.shape)
    pieces = [
        vmap(pullback)(one_hot_rows(start, stop, tuple(out.shape), out))[0]
        for start, stop in spans(out.numel(), chunk)
    ]
    return joined(pieces).reshape(*out.shape, *primal.shape)


def jvp_basis(fn: Fn, primal: Tensor, chunk: int | None, tangent_shape: tuple[int, ...] | None = None) -> Tensor:
    """Jacobian of fn at primal by forward mode: (*fn(primal).shape, *tangent_shape).

    With `tangent_shape` shorter than primal's shape (the per-sample shape), each basis
    vector is broadcast over the leading dimensions of primal: the batch trick.
    """
    shape = tuple(primal.shape) if tangent_shape is None else tangent_shape

    def push(tangent: Tensor) -> Tensor:
        return jvp(fn, (primal,), (tangent.expand_as(primal),))[1]

    pieces = [vmap(push)(one_hot_rows(start, stop, shape, primal)) for start, stop in spans(math.prod(shape), chunk)]
    columns = joined(pieces)  # (k, *out)
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


def batched_grad(outputs: Tensor, x: Tensor, seeds: Tensor, create_graph: bool) -> Tensor:
    """Vector-Jacobian products of outputs w.r.t. x for each seed in seeds (k, *outputs.shape):
    (k, *x.shape), vectorized; a single seed skips vmap."""
    if seeds.shape[0] == 1:
        (grad,) = torch.autograd.grad(outputs, x, seeds[0], retain_graph=True, create_graph=create_graph,
                                      materialize_grads=True)
        return grad[None]
    (grads,) = torch.autograd.grad(outputs, x, seeds, retain_graph=True, create_graph=create_graph,
                                   is_grads_batched=True, materialize_grads=True)
    if grads.dim() == x.dim():  # outputs do not depend on x: the zeros come without the seed dimension
        grads = grads.expand(seeds.shape[0], *grads.shape)
    return grads


def own_sample_rows(outputs: Tensor, x: Tensor, chunk: int | None, create_graph: bool) -> Tensor:
    """Gradient of every entry of outputs (B, *rest) w.r.t. x, keeping only its own sample's
    block: (B, *rest, *in). Exact for batch-coupled functions (B times the work of the batch
    trick); `chunk` rows per vectorized backward pass, so the (B*R, B*R) identity of seeds is
    built only when chunk is None."""
    batch, rest = outputs.shape[0], tuple(outputs.shape[1:])
    flat = outputs.reshape(-1)
    per_sample = flat.numel() // batch if batch else 0
    if per_sample == 0:
        return x.new_zeros(*outputs.shape, *x.shape[1:])
    rows = own_sample_gradients(flat, entry_samples(flat, batch), x, chunk, create_graph)  # (B * R, *in)
    return rows.reshape(batch, *rest, *x.shape[1:])


def entry_samples(flat: Tensor, batch: int) -> Tensor:
    """The sample each entry of a flattened batch output (B * m,) belongs to: (B * m,)."""
    return torch.arange(flat.numel(), device=flat.device) // (flat.numel() // batch)


def own_sample_gradients(values: Tensor, samples: Tensor, x: Tensor, chunk: int | None,
                         create_graph: bool) -> Tensor:
    """Gradient of each of values (R,) w.r.t. x, keeping the block of x[samples[r]]: (R, *in);
    `chunk` values per vectorized backward pass."""
    if not values.requires_grad:  # values do not depend on x
        return x.new_zeros(values.numel(), *x.shape[1:])
    return joined([own_sample_span(values, samples, x, start, stop, create_graph)
                   for start, stop in spans(values.numel(), chunk)])


def own_sample_span(values: Tensor, samples: Tensor, x: Tensor, start: int, stop: int,
                    create_graph: bool) -> Tensor:
    """own_sample_gradients of values[start:stop] by one vectorized backward pass: (stop - start, *in)."""
    grads = batched_grad(values, x, one_hot_rows(start, stop, tuple(values.shape), values), create_graph)
    return grads[torch.arange(stop - start, device=x.device), samples[start:stop]]


def batch_first(jac: Tensor, out_dims: int) -> Tensor:
    """(*out, B, *in) -> (B, *out, *in)."""
    return jac.movedim(out_dims, 0)
