"""Several derivatives at once (`autojac.derivatives`): the value, the Jacobian, and a second-order
quantity (Hessian diagonal, Laplacian, Hessian), in one plan, sharing the work.

A result is a tuple in `problem.want`'s order (models.DERIVATIVES): value (B, *out), jacobian
(B, *out, *in), hessian_diag (B, *out, *in), laplacian (B, *out), hessian (B, *out, *in, *in).
Sizes: B samples, n input and m output elements per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev

from ..problem import Problem, Sizes, result_shape
from .basis import (batched_grad, chosen_seeds, entry_samples, grad_input, joined, ones_seed, own_sample_gradients,
                    own_sample_span, per_sample, row_seeds, spans, vjp_of)
from .curvature import diagonal_of, double_pass_memory, input_basis_rows
from .registry import BATCH_INDEPENDENT, COUPLED_CHUNKS, VMAP, Strategy, register, set_heuristic

DERIVATIVES_OP = frozenset({"derivatives"})
SECOND = ("hessian_diag", "laplacian", "hessian")


def _nested(p: Problem, chunk: int | None) -> tuple[Tensor, ...]:
    # What a PINN user writes: one forward pass (the value), one backward pass per output element
    # (its gradient on every sample at once: the Jacobian), kept differentiable when second
    # derivatives are asked for; then per input direction, `chunk` at a time, a backward pass of
    # each gradient (rows of every H[b, k]).
    second = [q for q in p.want if q in SECOND]
    x = grad_input(p)
    y = p.f(x)
    batch, out_shape = y.shape[0], tuple(y.shape[1:])
    found: dict[str, Tensor] = {"value": y}
    if (second or "jacobian" in p.want) and y.requires_grad:
        seeds = row_seeds(out_shape, batch, y) if out_shape else (ones_seed(tuple(y.shape), y),)
        graph = bool(second) or p.create_graph
        last = len(seeds) - 1
        grads = [vjp_of(y, x, seed, retain=bool(second) or k < last, create_graph=graph) for k, seed in enumerate(seeds)]
        found["jacobian"] = torch.stack(grads, 1).view(batch, *out_shape, *p.in_shape)
        if second and p.second_dims is not None:  # rows along the chosen directions only
            rows = [_chosen_rows(g, x, p.second_dims, chunk, p.create_graph) for g in grads]  # each (k, B, n)
            chosen = torch.stack(rows)[..., list(p.second_dims)]  # (m, k, B, k)
            found["hessian"] = chosen.movedim(2, 0).reshape(batch, *out_shape, *chosen.shape[1:2], chosen.shape[-1])
            found["hessian_diag"] = found["hessian"].diagonal(dim1=-2, dim2=-1)
            found["laplacian"] = found["hessian_diag"].sum(-1)
        elif second:
            rows = [joined([input_basis_rows(g, x, start, stop, p.create_graph) for start, stop in spans(p.n, chunk)])
                    for g in grads]  # each (n, B, *in)
            hessian = torch.stack(rows).view(*out_shape, *p.in_shape, *x.shape)  # (*out, *in, B, *in)
            _second_from(found, p, hessian.movedim(len(out_shape) + len(p.in_shape), 0))
    return _ordered(found, p, out_shape)


def _chosen_rows(grad: Tensor, x: Tensor, directions: tuple[int, ...], chunk: int | None,
                 create_graph: bool) -> Tensor:
    """Rows of every sample's Hessian of one output element along the chosen input directions, from
    its differentiable per-sample gradient (B, *in): (k, B, n), `chunk` directions per pass."""
    batch, n = grad.shape[0], grad[0].numel()
    if not grad.requires_grad:
        return x.new_zeros(len(directions), batch, n)
    pieces = []
    for start, stop in spans(len(directions), chunk):
        seeds = chosen_seeds(directions[start:stop], tuple(grad.shape[1:]), batch, x)
        pieces.append(batched_grad(grad, x, seeds, create_graph).reshape(stop - start, batch, n))
    return joined(pieces)


def _second_from(found: dict[str, Tensor], p: Problem, hessian: Tensor) -> None:
    """Fill what p.want asks of the second order from the whole per-sample Hessians
    (B, *out, *in, *in) (cut to p.second_dims, flattened, where they were chosen)."""
    if p.second_dims is not None:
        n, index = p.n, list(p.second_dims)
        square = hessian.reshape(*hessian.shape[: hessian.dim() - 2 * len(p.in_shape)], n, n)
        found["hessian"] = square[..., index, :][..., index]
        found["hessian_diag"] = found["hessian"].diagonal(dim1=-2, dim2=-1)
        found["laplacian"] = found["hessian_diag"].sum(-1)
        return
    if "hessian" in p.want:
        found["hessian"] = hessian
    if "hessian_diag" in p.want or "laplacian" in p.want:
        diag = diagonal_of(hessian, p.in_shape)
        found["hessian_diag"] = diag
        found["laplacian"] = diag.reshape(*diag.shape[: diag.dim() - len(p.in_shape)], -1).sum(-1)


def _ordered(found: dict[str, Tensor], p: Problem, out_shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """The asked quantities in order; zeros for those f's graph does not reach (f ignores x)."""
    second_shape = p.in_shape if p.second_dims is None else (len(p.second_dims),)
    return tuple(found[q] if q in found else p.x.new_zeros(
        result_shape(q, p.batch, out_shape, p.in_shape if q in ("value", "jacobian") else second_shape))
        for q in p.want)


def _vmap(p: Problem, chunk: int | None) -> tuple[Tensor, ...]:
    # torch.func per sample: reverse mode for the Jacobian, forward over it for the Hessian, each
    # level handing the lower ones up as auxiliary outputs, so that f runs once per sample.
    second = any(q in SECOND for q in p.want)

    def transform(f_one: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Any]:  # Any: returns a tuple
        def value_twice(z: Tensor) -> tuple[Tensor, Tensor]:
            y = f_one(z)
            return y, y

        def jacobian_and_lower(z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            jac, y = jacrev(value_twice, has_aux=True)(z)
            return jac, (jac, y)

        def run(xi: Tensor) -> tuple[Tensor, ...]:
            if second:
                hess, (jac, y) = jacfwd(jacobian_and_lower, has_aux=True)(xi)
                return y, jac, hess
            jac, y = jacrev(value_twice, has_aux=True)(xi)
            return y, jac

        return run

    results = per_sample(p, transform)
    found = {"value": results[0], "jacobian": results[1]}
    if second:
        _second_from(found, p, results[2])
    return _ordered(found, p, tuple(results[0].shape[1:]))


def _full(p: Problem, chunk: int | None) -> tuple[Tensor, ...]:
    # Batch-coupled f: each sample's own blocks from rows of the whole batch's derivatives (B times
    # the work of the batch trick). Per span of `chunk` output entries, their own-sample gradients
    # (Jacobian rows), differentiated again where second derivatives are asked.
    second = any(q in SECOND for q in p.want)
    x = grad_input(p)
    y = p.f(x)
    out_shape, flat = tuple(y.shape[1:]), y.reshape(-1)
    found: dict[str, Tensor] = {"value": y}
    if flat.numel() and flat.requires_grad and (second or "jacobian" in p.want):
        samples = entry_samples(flat, p.batch)
        firsts, seconds = [], []
        for start, stop in spans(flat.numel(), chunk):
            first = own_sample_span(flat, samples, x, start, stop, create_graph=second or p.create_graph)
            firsts.append(first)  # (k, *in)
            if second:
                seconds.append(own_sample_gradients(first.reshape(-1), samples[start:stop].repeat_interleave(p.n),
                                                    x, chunk, p.create_graph))  # (k n, *in)
        found["jacobian"] = joined(firsts).reshape(p.batch, *out_shape, *p.in_shape)
        if second:
            _second_from(found, p, joined(seconds).reshape(p.batch, *out_shape, *p.in_shape, *p.in_shape))
    return _ordered(found, p, out_shape)


def _memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return double_pass_memory(s, c, s.batch * s.n, "hessian") + s.m * s.activations


def _full_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.batch * s.m  # output entries per span; their n-fold second level, as many at a time
    return double_pass_memory(s, c, s.batch * s.m, "hessian") + s.tensor(c * s.n, s.batch, s.n)


def _vmap_memory(s: Sizes, chunk: int | None) -> int:
    return double_pass_memory(s, s.n * s.m, s.n, "hessian")


register(Strategy(
    name="nested_derivatives", ops=DERIVATIVES_OP, run=_nested, memory=_memory, basis=lambda s: s.n,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="nested autograd sharing one forward pass and one first backward pass (what PINN code writes)",
))
register(Strategy(
    name="vmap_derivatives", ops=DERIVATIVES_OP, run=_vmap, memory=_vmap_memory,
    needs=frozenset({BATCH_INDEPENDENT, VMAP}),
    summary="vmap over samples of jacfwd(jacrev(f)) with the lower orders as auxiliary outputs",
))

register(Strategy(
    name="full_derivatives", ops=DERIVATIVES_OP, run=_full, memory=_full_memory,
    basis=lambda s: s.batch * s.m, chunks=COUPLED_CHUNKS, coupled_only=True, autograd=True,
    summary="own-sample blocks of the whole batch's derivatives, row by row; exact for batch-coupled f",
))


def _heuristic(s: Sizes) -> list[str]:
    return ["jet_derivatives", "nested_derivatives", "vmap_derivatives"]


set_heuristic("derivatives", _heuristic)
