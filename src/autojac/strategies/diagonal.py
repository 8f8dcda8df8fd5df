"""Per-sample Hessian diagonals (B, *out, *in) and Laplacians (B, *out), their sums.

Each strategy computes the diagonal d[b, k, i] = d^2 f(x)[b, k] / d x[b, i]^2, `chunk` input
coordinates per vectorized pass, and a Laplacian sums it over i. The engine's forward Laplacian
(jet_laplacian, in jet.py), which serves both for every f it has rules for, comes first.
Sizes: B samples, n input and m output elements per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vmap

from ..problem import Problem, Sizes
from .basis import joined, one_hot_rows, spans
from .curvature import (OPS_DIAGONAL, diagonal_of, double_pass_memory, finish_diagonal, output_gradients,
                        input_basis_rows, summed_jacobian, zeros_result)
from .hessian import vmap_fwd_rev
from .registry import BATCH_INDEPENDENT, VMAP, Strategy, register, set_heuristic


def _diagonal_along_basis(p: Problem, chunk: int | None, second: Callable[[Tensor], Tensor]) -> Tensor:
    """The diagonal (B, *out, *in) from second(t) = t^T H[b] t for t = e_i broadcast over the batch
    ((B, *in) -> (B, *out)), `chunk` input coordinates per vectorized pass."""
    def push(direction: Tensor) -> Tensor:
        return second(direction.expand_as(p.x))

    diag = joined([vmap(push)(one_hot_rows(start, stop, p.in_shape, p.x))
                      for start, stop in spans(p.n, chunk)])  # (n, B, *out)
    return diag.movedim(0, -1).reshape(*diag.shape[1:], *p.in_shape)


def _fwd_fwd(p: Problem, chunk: int | None) -> Tensor:
    # Nested forward mode along e_i (broadcast over the batch): the jvp of the jvp is
    # e_i^T H[b] e_i for every sample, without the rest of the Hessian.
    def second(t: Tensor) -> Tensor:
        return jvp(lambda z: jvp(p.f, (z,), (t,))[1], (p.x,), (t,))[1]

    return finish_diagonal(p, _diagonal_along_basis(p, chunk, second))


def _hvp_diag(p: Problem, chunk: int | None) -> Tensor:
    # Forward over reverse along e_i, keeping only coordinate i of each gradient before the jvp.
    jacobian = summed_jacobian(p.f)  # (*out, B, *in)
    in_dims = tuple(range(-len(p.in_shape), 0))

    def picked(z: Tensor, t: Tensor) -> Tensor:  # (*out, B): coordinate i of each gradient
        product = jacobian(z) * t
        return product.sum(in_dims) if in_dims else product  # (sum(()) would sum every dimension)

    def second(t: Tensor) -> Tensor:
        return jvp(lambda z: picked(z, t), (p.x,), (t,))[1].movedim(-1, 0)

    return finish_diagonal(p, _diagonal_along_basis(p, chunk, second))


def _grad_grad_diag(p: Problem, chunk: int | None) -> Tensor:
    # Reverse over reverse in plain autograd: rows of every H[b, k] from output k's
    # differentiable per-sample gradient seeded with e_i on every sample, keeping entry i.
    x, out_shape, grads = output_gradients(p)
    if grads is None:
        return zeros_result(p, out_shape)
    pieces = []
    for g in grads:
        for start, stop in spans(p.n, chunk):
            rows = input_basis_rows(g, x, start, stop, p.create_graph).reshape(stop - start, p.batch, p.n)
            coords = torch.arange(start, stop, device=x.device)
            pieces.append(rows[coords - start, :, coords])  # (c, B)
    diag = joined(pieces).reshape(-1, p.batch).t()  # (B, m * n)
    return finish_diagonal(p, diag.reshape(p.batch, *out_shape, *p.in_shape))


def _loop_diag(p: Problem, chunk: int | None) -> Tensor:
    # No vmap anywhere: one autograd.grad per output element, then per (output, input) element.
    return _grad_grad_diag(p, 1)


def _vmap_hessian_diag(p: Problem, chunk: int | None) -> Tensor:
    # The diagonal of the whole per-sample Hessian from vmap(torch.func.hessian).
    return finish_diagonal(p, diagonal_of(vmap_fwd_rev(p, chunk), p.in_shape))


def _forward_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return double_pass_memory(s, c, s.batch * s.n, "hessian_diag")


def _reverse_in_forward_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return double_pass_memory(s, c * s.m, s.batch * s.n, "hessian_diag")


def _grad_grad_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return double_pass_memory(s, c, s.batch * s.n, "hessian_diag") + s.m * s.activations


def _loop_memory(s: Sizes, chunk: int | None) -> int:
    return _grad_grad_memory(s, 1)


def _vmap_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return double_pass_memory(s, c * s.m, s.n, "hessian")


register(Strategy(
    name="fwd_fwd_diag", ops=OPS_DIAGONAL, run=_fwd_fwd, memory=_forward_memory, basis=lambda s: s.n,
    nests_forward=True,
    needs=frozenset({BATCH_INDEPENDENT}),
    summary="nested forward mode (jvp of jvp) along each input basis vector broadcast over the batch",
))
register(Strategy(
    name="hvp_diag", ops=OPS_DIAGONAL, run=_hvp_diag, memory=_reverse_in_forward_memory, basis=lambda s: s.n,
    needs=frozenset({BATCH_INDEPENDENT}),
    summary="forward-over-reverse HVPs along each input basis vector broadcast over the batch, one "
            "entry kept",
))
register(Strategy(
    name="grad_grad_diag", ops=OPS_DIAGONAL, run=_grad_grad_diag, memory=_grad_grad_memory, basis=lambda s: s.n,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="reverse over reverse with the batch trick in plain autograd, one entry per Hessian row kept",
))
register(Strategy(
    name="loop_diag", ops=OPS_DIAGONAL, run=_loop_diag, memory=_loop_memory,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="one autograd.grad per output element, then per (output, input) element; no vmap",
))
register(Strategy(
    name="vmap_hessian_diag", ops=OPS_DIAGONAL, run=_vmap_hessian_diag, memory=_vmap_memory, basis=lambda s: s.n,
    needs=frozenset({BATCH_INDEPENDENT, VMAP}),
    summary="the diagonal of the full per-sample Hessian, vmap(torch.func.hessian(f))",
))


def _order(s: Sizes) -> list[str]:
    # Measured on CPU (benchmarks/second_order.py, tanh MLP; benchmarks/pinn.py): the engine wins
    # wherever it applies (1.2x to 100x). For other f: double backward for scalar outputs (looped
    # rather than vectorized for wide inputs kept differentiable), nested forward mode for vector
    # outputs (its cost does not grow with m).
    if s.m > 1:
        return ["fwd_fwd_diag", "vmap_hessian_diag", "hvp_diag", "grad_grad_diag", "loop_diag"]
    if s.create_graph and s.n > 16:
        return ["loop_diag", "vmap_hessian_diag", "hvp_diag", "grad_grad_diag", "fwd_fwd_diag"]
    return ["grad_grad_diag", "loop_diag", "vmap_hessian_diag", "hvp_diag", "fwd_fwd_diag"]


def _laplacian(s: Sizes) -> list[str]:
    # The forward Laplacian carries one second-order stack whatever n: always first.
    return ["jet_laplacian", "jet_fwd_rev", *_order(s)]


def _hessian_diag(s: Sizes) -> list[str]:
    # Per direction, the forward pass carries a second-order stack through every later layer; the
    # adjoint form weights each operation's own term once, per output element: first when the
    # outputs are fewer than the inputs (B=4096, n=10 to 50, m=1: 1.2-1.4x faster).
    engine = ["jet_fwd_rev", "jet_laplacian"] if s.m < s.n else ["jet_laplacian", "jet_fwd_rev"]
    return [*engine, *_order(s)]


set_heuristic("hessian_diag", _hessian_diag)
set_heuristic("laplacian", _laplacian)
