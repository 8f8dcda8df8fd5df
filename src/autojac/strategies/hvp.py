"""Per-sample Hessian-vector products (B, *out, *in): Hv[b, k] = H[b, k] @ v[b].

None of these builds a Hessian: each costs a few passes over f per output element.
Sizes: B samples, n input and m output elements per sample; c the output elements handled
per vectorized pass.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torch.func import jvp

from ..problem import Problem, Sizes
from .basis import batch_first, batch_vjp_rows, own_sample_gradients, vjp_of
from .curvature import coupled_second_level, double_pass_memory, output_gradients, summed_jacobian, zeros_result
from .registry import BATCH_INDEPENDENT, COUPLED_CHUNKS, Strategy, register, set_heuristic

HVP = frozenset({"hvp"})


def _hvp_fwd_rev(p: Problem, chunk: int | None) -> Tensor:
    # Forward over reverse: the jvp along v of every sample's gradient (batch trick), which is
    # H[b] v[b] because v[b] only moves sample b.
    _, hv = jvp(summed_jacobian(p.f, chunk), (p.x,), (p.v,))  # type: ignore[misc]  # (*out, B, *in)
    return batch_first(hv, hv.dim() - p.x.dim())


def _hvp_rev_fwd(p: Problem, chunk: int | None) -> Tensor:
    # Reverse over forward: every sample's gradient of its directional derivative J[b] v[b] (the
    # batch trick) is H[b]^T v[b] = H[b] v[b].
    def directional(z: Tensor) -> Tensor:
        return jvp(p.f, (z,), (p.v,))[1]

    hv = batch_vjp_rows(directional, p.x, chunk)  # (*out, B, *in)
    return batch_first(hv, hv.dim() - p.x.dim())


def _hvp_rev_rev(p: Problem, chunk: int | None) -> Tensor:
    # Reverse over reverse (double backward) in plain autograd, no vmap anywhere: each output
    # element's differentiable per-sample gradient, seeded with v. (Seeding all output elements
    # at once by is_grads_batched costs m times the work: measured never faster.)
    x, out_shape, grads = output_gradients(p)
    if grads is None:
        return zeros_result(p, out_shape)
    last = len(grads) - 1
    rows = [vjp_of(g, x, cast(Tensor, p.v), retain=k < last, create_graph=p.create_graph) if g.requires_grad
            else torch.zeros_like(x) for k, g in enumerate(grads)]
    if len(rows) == 1:
        return rows[0].view(x.shape[0], *out_shape, *p.in_shape)
    return torch.stack(rows, 1).view(x.shape[0], *out_shape, *p.in_shape)


def _full_hvp(p: Problem, chunk: int | None) -> Tensor:
    # Batch-coupled f: per span of output entries, each one's own-sample gradient contracted
    # with its sample's v, then that scalar's own-sample gradient. 2 B m backward passes' worth
    # of work, no Hessian.
    def second(first: Tensor, samples: Tensor, x: Tensor) -> Tensor:  # (k, *in)
        directional = (first * cast(Tensor, p.v)[samples]).reshape(len(samples), -1).sum(-1)  # (k,)
        return own_sample_gradients(directional, samples, x, None, p.create_graph)

    pieces, out_shape = coupled_second_level(p, chunk, second)
    if pieces is None:
        return zeros_result(p, out_shape)
    return pieces.reshape(p.batch, *out_shape, *p.in_shape)


def _vector_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.m
    return double_pass_memory(s, c, s.batch * s.n, "hvp")


def _loop_memory(s: Sizes, chunk: int | None) -> int:
    return double_pass_memory(s, 1, s.batch * s.n, "hvp")


def _full_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.batch * s.m
    return double_pass_memory(s, c, s.batch * s.m, "hvp")


def _out_basis(s: Sizes) -> int:
    return s.m


register(Strategy(
    name="hvp_fwd_rev", ops=HVP, run=_hvp_fwd_rev, memory=_vector_memory, basis=_out_basis,
    needs=frozenset({BATCH_INDEPENDENT}),
    summary="forward over reverse: jvp along v of the gradient of the batch-summed output",
))
register(Strategy(
    name="hvp_rev_fwd", ops=HVP, run=_hvp_rev_fwd, memory=_vector_memory, basis=_out_basis,
    nests_forward=True,
    needs=frozenset({BATCH_INDEPENDENT}),
    summary="reverse over forward: gradient of the batch-summed jvp along v",
))
register(Strategy(
    name="hvp_rev_rev", ops=HVP, run=_hvp_rev_rev, memory=_loop_memory,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="reverse over reverse (double backward), one autograd.grad per output element and level; no vmap",
))
register(Strategy(
    name="full_hvp", ops=HVP, run=_full_hvp, memory=_full_memory,
    basis=lambda s: s.batch * s.m, chunks=COUPLED_CHUNKS, coupled_only=True, autograd=True,
    summary="own-sample gradients of the whole batch contracted with v, differentiated again; exact "
            "for batch-coupled f",
))


def _heuristic(s: Sizes) -> list[str]:
    # Measured on CPU (benchmarks/second_order.py, tanh MLP): carrying J forward costs about n
    # forward passes, double backward about 4 per output element, so the forward pass wins when
    # n <= 4 m; otherwise double backward, except for vector outputs kept differentiable, where
    # reverse over forward (one vectorized pass) is cheaper to differentiate again.
    order = ["hvp_rev_rev", "hvp_rev_fwd", "hvp_fwd_rev"]
    if s.create_graph and s.m > 1:
        order = ["hvp_rev_fwd", "hvp_rev_rev", "hvp_fwd_rev"]
    return ["jet_hvp", "jet_fwd_rev", *order] if s.n <= 4 * s.m else [*order, "jet_hvp", "jet_fwd_rev"]


set_heuristic("hvp", _heuristic)
