"""Per-sample Hessians (B, *out, *in, *in): H[b, k] = d^2 f(x)[b, k] / d x[b]^2.

Sizes: B samples, n input and m output elements per sample; A is the bytes f saves for
backward over the whole batch, c the basis vectors handled per vectorized pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev

from ..problem import Problem, Sizes
from .basis import batch_first, joined, jvp_basis, own_sample_gradients, per_sample, spans
from .curvature import (OPS_DIAGONAL, coupled_second_level, diagonal_of, double_pass_memory, finish_diagonal, output_gradients,
                        input_basis_rows, summed_jacobian, zeros_result)
from .registry import BATCH_INDEPENDENT, COUPLED_CHUNKS, VMAP, Strategy, register, set_heuristic

HESSIAN = frozenset({"hessian"})


def vmap_fwd_rev(p: Problem, chunk: int | None) -> Tensor:
    """vmap(torch.func.hessian(f)) over the samples: forward mode (chunk tangents at a time) over
    reverse mode; (B, *out, *in, *in). Also the base of the diagonal strategy vmap_hessian_diag."""
    if chunk is None:
        return per_sample(p, lambda f_one: jacfwd(jacrev(f_one)))
    return per_sample(p, lambda f_one: lambda xi: jvp_basis(jacrev(f_one), xi, chunk))


def _vmap_rev_rev(p: Problem, chunk: int | None) -> Tensor:
    return per_sample(p, lambda f_one: jacrev(jacrev(f_one), chunk_size=chunk))


def _sum_fwd_rev(p: Problem, chunk: int | None) -> Tensor:
    # The batch trick twice: reverse mode on the batch-summed output gives every sample's
    # gradient; forward mode along e_i broadcast over the batch differentiates all of them at
    # once (an HVP along e_i per sample), giving column i of every H[b].
    hess = jvp_basis(summed_jacobian(p.f), p.x, chunk, tangent_shape=p.in_shape)  # (*out, B, *in, *in)
    return batch_first(hess, hess.dim() - 1 - 2 * len(p.in_shape))


def _sum_grad_grad(p: Problem, chunk: int | None) -> Tensor:
    # Reverse over reverse with the batch trick, in plain autograd (less overhead than
    # torch.func): each output element's differentiable per-sample gradient, seeded with e_i on
    # every sample, gives row i of every H[b, k]; `chunk` rows per vectorized backward pass.
    x, out_shape, grads = output_gradients(p)
    if grads is None:
        return zeros_result(p, out_shape)
    rows = [input_basis_rows(g, x, start, stop, p.create_graph) for g in grads for start, stop in spans(p.n, chunk)]
    hess = joined(rows).reshape(*out_shape, *p.in_shape, *x.shape)  # (*out, *in, B, *in)
    return hess.movedim(len(out_shape) + len(p.in_shape), 0)


def _loop_grad_grad(p: Problem, chunk: int | None) -> Tensor:
    # One plain autograd.grad per output element, then per (output, input) element: no vmap
    # anywhere (not even is_grads_batched), for f whose backward vmap cannot run.
    return _sum_grad_grad(p, 1)


def _full_hessian(p: Problem, chunk: int | None) -> Tensor:
    # Diagonal blocks of the whole-batch Hessian: exact for batch-coupled f. Per span of output
    # entries, each entry of their own-sample gradients (k, *in) differentiated again, own sample.
    def second(first: Tensor, samples: Tensor, x: Tensor) -> Tensor:  # (k n, *in)
        return own_sample_gradients(first.reshape(-1), samples.repeat_interleave(p.n), x, chunk, p.create_graph)

    pieces, out_shape = coupled_second_level(p, chunk, second)
    if pieces is None:
        return zeros_result(p, out_shape)
    hess = pieces.reshape(p.batch, *out_shape, *p.in_shape, *p.in_shape)
    if p.op == "hessian":
        return hess
    return finish_diagonal(p, diagonal_of(hess, p.in_shape))


def _forward_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return double_pass_memory(s, c * s.m, s.n, "hessian")


def _reverse_memory(s: Sizes, chunk: int | None) -> int:
    # Each of the c outer seeds differentiates the inner level's vectorized backward pass, all m
    # of its lanes: c * m passes' worth (a decoder 8 -> 784 at B=1, unchunked: 6272 seeds x 784
    # lanes, over 24 GB, where counting the seeds alone said 125 MB).
    c = chunk or s.m * s.n
    return double_pass_memory(s, c * s.m, s.batch * s.n, "hessian")


def _grad_grad_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return double_pass_memory(s, c, s.batch * s.n, "hessian") + s.m * s.activations


def _loop_memory(s: Sizes, chunk: int | None) -> int:
    return _grad_grad_memory(s, 1)


def _full_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.batch * s.m  # output entries per span; their n-fold second level, as many at a time
    return double_pass_memory(s, c, s.batch * s.m, "hessian") + s.tensor(c * s.n, s.batch, s.n)


def _in_basis(s: Sizes) -> int:
    return s.n


def _pair_basis(s: Sizes) -> int:
    return s.m * s.n


register(Strategy(
    name="vmap_fwd_rev", ops=HESSIAN, run=vmap_fwd_rev, memory=_forward_memory, basis=_in_basis,
    needs=frozenset({BATCH_INDEPENDENT, VMAP}),
    summary="vmap over samples of forward-over-reverse on one sample (vmap(torch.func.hessian(f)))",
))
register(Strategy(
    name="vmap_rev_rev", ops=HESSIAN, run=_vmap_rev_rev, memory=_reverse_memory, basis=_pair_basis,
    needs=frozenset({BATCH_INDEPENDENT, VMAP}),
    summary="vmap over samples of reverse-over-reverse on one sample (vmap(jacrev(jacrev(f))))",
))
register(Strategy(
    name="sum_fwd_rev", ops=HESSIAN, run=_sum_fwd_rev, memory=_forward_memory, basis=_in_basis,
    needs=frozenset({BATCH_INDEPENDENT}),
    summary="the batch trick twice: forward-mode HVPs along each input basis vector, broadcast over "
            "the batch, of the reverse-mode gradient of the batch-summed output",
))
register(Strategy(
    name="sum_grad_grad", ops=HESSIAN, run=_sum_grad_grad, memory=_grad_grad_memory, basis=_in_basis,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="reverse over reverse with the batch trick in plain autograd (is_grads_batched)",
))
register(Strategy(
    name="loop_grad_grad", ops=HESSIAN, run=_loop_grad_grad, memory=_loop_memory,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="one autograd.grad per output element, then per (output, input) element; no vmap",
))
register(Strategy(
    name="full_hessian", ops=HESSIAN | OPS_DIAGONAL, run=_full_hessian, memory=_full_memory,
    basis=lambda s: s.batch * s.m, chunks=COUPLED_CHUNKS, coupled_only=True, autograd=True,
    summary="diagonal blocks of the whole-batch Hessian, row by row of the batch; exact for "
            "batch-coupled f",
))


def _heuristic(s: Sizes) -> list[str]:
    # Measured on CPU (benchmarks/second_order.py, tanh MLP): the engine's Hessian (n^2 carried
    # per unit) wins when n <= 4 m; otherwise double backward vectorized over the input basis,
    # unless the result must stay differentiable: differentiating its vmapped backward again is
    # 3-5x slower at n = 128, where vmap over samples (m = 1) or forward over reverse wins.
    if s.create_graph:
        order = (["vmap_rev_rev", "loop_grad_grad", "sum_grad_grad", "vmap_fwd_rev", "sum_fwd_rev"] if s.m == 1
                 else ["sum_fwd_rev", "vmap_fwd_rev", "loop_grad_grad", "sum_grad_grad", "vmap_rev_rev"])
    else:
        order = (["sum_grad_grad", "loop_grad_grad", "vmap_rev_rev", "vmap_fwd_rev", "sum_fwd_rev"] if s.m == 1
                 else ["sum_grad_grad", "sum_fwd_rev", "vmap_fwd_rev", "loop_grad_grad", "vmap_rev_rev"])
    # The engine's adjoint form carries n tangents and sweeps back once per output element; its
    # forward form carries n (n + 1) / 2 second-order stacks: the former first for few outputs.
    engine = ["jet_fwd_rev", "jet_hessian"] if s.m <= 4 else ["jet_hessian", "jet_fwd_rev"]
    return [*engine, *order] if s.n <= 4 * s.m or s.m <= 4 and s.n <= 64 else [*order, *engine]


set_heuristic("hessian", _heuristic)
