"""Building blocks shared by the second-order strategies (Hessians, HVPs, diagonals, Laplacians).

Sizes: B samples, n input and m output elements per sample. All blocks assume a
batch-independent f unless they say otherwise: then the gradient of the batch-summed output
w.r.t. x[b] is sample b's own gradient, and a basis vector broadcast over the batch probes
every sample at once (the batch trick).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..problem import Problem, Sizes, result_shape
from .basis import (Fn, batch_vjp_rows, batched_grad, broadcast_rows, entry_samples, grad_input, joined, ones_seed,
                    own_sample_span, row_seeds, spans, vjp_of)

OPS_DIAGONAL = frozenset({"hessian_diag", "laplacian"})


def summed_jacobian(f: Fn, chunk: int | None = None) -> Fn:
    """x (B, *in) -> (*out, B, *in): every sample's Jacobian by reverse mode, each output coordinate
    seeded on every sample at once (the batch trick); a torch.func function, so it can be
    differentiated again by jvp or vjp."""
    return lambda x: batch_vjp_rows(f, x, chunk)


def input_basis_rows(grad: Tensor, x: Tensor, start: int, stop: int, create_graph: bool) -> Tensor:
    """Rows start .. stop-1 of every sample's Hessian of one output element, from its differentiable
    per-sample gradient grad (B, *in), by seeding grad with e_i on every sample: (stop - start, B, *in).
    One seed is one plain autograd.grad: no vmap."""
    batch, in_shape = grad.shape[0], tuple(grad.shape[1:])
    if not grad.requires_grad:  # grad does not depend on x: those rows are zero
        return x.new_zeros(stop - start, *x.shape)
    return batched_grad(grad, x, broadcast_rows(start, stop, in_shape, batch, x), create_graph)


def output_gradients(p: Problem) -> tuple[Tensor, tuple[int, ...], list[Tensor] | None]:
    """With grad mode on: the x to differentiate w.r.t. (grad_input), f's per-sample output shape,
    and for each output element k every sample's gradient of y[b, k], each (B, *in) and kept
    differentiable: one plain autograd.grad per output element seeded on every sample (no vmap);
    None if y ignores x."""
    x = grad_input(p)
    y = p.f(x)
    out_shape = tuple(y.shape[1:])
    if not y.requires_grad:
        return x, out_shape, None
    seeds = row_seeds(out_shape, y.shape[0], y) if out_shape else (ones_seed(tuple(y.shape), y),)
    return x, out_shape, [vjp_of(y, x, seed, retain=True, create_graph=True) for seed in seeds]


def zeros_result(p: Problem, out_shape: tuple[int, ...]) -> Tensor:
    """The result of p.op for an f whose second derivatives vanish (f ignores x, or is linear)."""
    return p.x.new_zeros(result_shape(p.op, p.batch, out_shape, p.in_shape))


def finish_diagonal(p: Problem, diag: Tensor) -> Tensor:
    """diag (B, *out, *in) as p.op wants it: itself for hessian_diag, its sum (B, *out) for laplacian."""
    if p.op == "laplacian":
        return diag.reshape(*diag.shape[: diag.dim() - len(p.in_shape)], -1).sum(-1)
    return diag


def diagonal_of(hessian: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """(B, *out, *in, *in) -> (B, *out, *in): the diagonal of each per-sample Hessian."""
    n = math.prod(in_shape)
    lead = hessian.shape[: hessian.dim() - 2 * len(in_shape)]
    return hessian.reshape(*lead, n, n).diagonal(dim1=-2, dim2=-1).reshape(*lead, *in_shape)


# Memory estimates. A (activations) is what one forward saves over the whole batch; a backward
# pass kept differentiable saves about as much again, and a vectorized pass over c basis
# vectors holds c copies of what one pass keeps alive.

def result_bytes(s: Sizes, op: str) -> int:
    tails = {"hessian": s.n * s.n, "hvp": s.n, "hessian_diag": s.n, "laplacian": 1}
    return s.tensor(s.batch, s.m, tails[op])


def double_pass_memory(s: Sizes, passes: int, seed_elements: int, op: str) -> int:
    """Peak bytes of `passes` vectorized second-order passes with seeds of seed_elements each."""
    return (s.activations * (3 + 2 * passes) + s.tensor(passes, seed_elements)
            + s.tensor(s.m, s.batch, s.n) + 2 * result_bytes(s, op))


def coupled_second_level(p: Problem, chunk: int | None,
                         second: Callable[[Tensor, Tensor, Tensor], Tensor]) -> tuple[Tensor | None, tuple[int, ...]]:
    """For batch-coupled f: for each span of `chunk` output entries of f(x), their own-sample
    gradients `first` (k, *in), differentiable, then `second(first, samples, x)` (samples: each
    entry's sample), through that span's graph only: differentiating the whole first level at
    once would make every pass run through all B m of its seeds. Returns the pieces joined
    (None when f(x) is empty or does not depend on x) and the per-sample output shape."""
    x = grad_input(p)
    y = p.f(x)
    flat, out_shape = y.reshape(-1), tuple(y.shape[1:])
    if flat.numel() == 0 or not flat.requires_grad:
        return None, out_shape
    samples = entry_samples(flat, p.batch)
    pieces = [second(own_sample_span(flat, samples, x, start, stop, create_graph=True), samples[start:stop], x)
              for start, stop in spans(flat.numel(), chunk)]
    return joined(pieces), out_shape
