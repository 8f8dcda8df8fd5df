"""First-order strategies: the per-sample Jacobian (B, *out, *in).

Sizes: B samples, n input and m output elements per sample; A is the bytes f saves for
backward over the whole batch, c the basis vectors handled per vectorized pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev

from ..problem import Problem, Sizes
from .basis import batch_vjp_rows, grad_input, jvp_basis, ones_seed, output_rows, own_sample_rows, per_sample, \
    row_seeds, vjp_of
from .registry import BATCH_INDEPENDENT, VMAP, Strategy, register, set_heuristic

JACOBIAN = frozenset({"jacobian"})


def _sum_rev(p: Problem, chunk: int | None) -> Tensor:
    # Batch-independent f: one vector-Jacobian product seeded with output coordinate i on every
    # sample gives row i of every sample's Jacobian (torch.func, vmapped over the rows).
    jac = batch_vjp_rows(p.f, p.x, chunk)  # (*out, B, *in)
    return jac.movedim(jac.dim() - p.x.dim(), 0)


def _sum_grad(p: Problem, chunk: int | None) -> Tensor:
    # sum_rev in plain autograd (is_grads_batched): less per-call overhead than torch.func.
    x = grad_input(p)
    y = p.f(x)
    out_shape = tuple(y.shape[1:])
    if not y.requires_grad or y.numel() == 0:
        return x.new_zeros(*y.shape, *x.shape[1:])
    rows = output_rows(y, x, chunk, p.create_graph)  # (m, B, *in)
    return rows.view(*out_shape, *x.shape).movedim(len(out_shape), 0)


def _sum_fwd(p: Problem, chunk: int | None) -> Tensor:
    # One tangent per input coordinate, the same for every sample: column of every J[b] at once.
    return jvp_basis(p.f, p.x, chunk, tangent_shape=p.in_shape)


def _vmap_rev(p: Problem, chunk: int | None) -> Tensor:
    return per_sample(p, lambda f_one: jacrev(f_one, chunk_size=chunk))


def _vmap_fwd(p: Problem, chunk: int | None) -> Tensor:
    if chunk is None:
        return per_sample(p, jacfwd)
    return per_sample(p, lambda f_one: lambda xi: jvp_basis(f_one, xi, chunk))


def _loop_rev(p: Problem, chunk: int | None) -> Tensor:
    # No vmap anywhere: one autograd.grad per output coordinate, seeded on every sample at once.
    x = grad_input(p)
    y = p.f(x)
    out_shape = tuple(y.shape[1:])
    if not y.requires_grad or y.numel() == 0:
        return x.new_zeros(*y.shape, *x.shape[1:])
    seeds = row_seeds(out_shape, y.shape[0], y) if out_shape else (ones_seed(tuple(y.shape), y),)
    last = len(seeds) - 1
    rows = [vjp_of(y, x, seed, retain=i < last, create_graph=p.create_graph) for i, seed in enumerate(seeds)]
    if len(rows) == 1:
        return rows[0].view(x.shape[0], *out_shape, *x.shape[1:])
    return torch.stack(rows, 1).view(x.shape[0], *out_shape, *x.shape[1:])


def _full_diag(p: Problem, chunk: int | None) -> Tensor:
    # Rows of the whole-batch Jacobian, `chunk` at a time, keeping only each row's own sample:
    # exact for batch-coupled f, and never builds the (B*m, B*m) identity.
    x = grad_input(p)
    return own_sample_rows(p.f(x), x, chunk, p.create_graph)


def _reverse_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.m
    return s.activations * (1 + c) + s.tensor(c, s.batch, s.n) + s.tensor(c, s.m) + s.tensor(s.batch, s.m, s.n)


def _forward_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return s.activations * (1 + c) + s.tensor(c, s.n) + s.tensor(s.batch, s.m, s.n)


def _loop_memory(s: Sizes, chunk: int | None) -> int:
    return 2 * s.activations + s.tensor(2, s.batch, s.n) + s.tensor(s.batch, s.m, s.n)


def _full_diag_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.batch * s.m
    per_row = s.activations + s.tensor(s.batch, s.n) + s.tensor(s.batch, s.m)
    return s.activations + c * per_row + 2 * s.tensor(s.batch, s.m, s.n)


def _out_basis(s: Sizes) -> int:
    return s.m


def _in_basis(s: Sizes) -> int:
    return s.n


register(Strategy(
    name="sum_rev", ops=JACOBIAN, run=_sum_rev, memory=_reverse_memory, basis=_out_basis, work=_out_basis,
    needs=frozenset({BATCH_INDEPENDENT}),
    summary="reverse mode on the batch-summed output: m vector-Jacobian products over the batch",
))
register(Strategy(
    name="sum_grad", ops=JACOBIAN, run=_sum_grad, memory=_reverse_memory, basis=_out_basis, work=_out_basis,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="sum_rev with torch.autograd.grad(is_grads_batched=True) instead of torch.func",
))
register(Strategy(
    name="sum_fwd", ops=JACOBIAN, run=_sum_fwd, memory=_forward_memory, basis=_in_basis, work=_in_basis,
    needs=frozenset({BATCH_INDEPENDENT}),
    summary="forward mode with each input basis vector broadcast over the batch: n JVPs",
))
register(Strategy(
    name="vmap_rev", ops=JACOBIAN, run=_vmap_rev, memory=_reverse_memory, basis=_out_basis, work=_out_basis,
    needs=frozenset({BATCH_INDEPENDENT, VMAP}),
    summary="vmap over samples of reverse mode on one sample (vmap(jacrev(f)))",
))
register(Strategy(
    name="vmap_fwd", ops=JACOBIAN, run=_vmap_fwd, memory=_forward_memory, basis=_in_basis, work=_in_basis,
    needs=frozenset({BATCH_INDEPENDENT, VMAP}),
    summary="vmap over samples of forward mode on one sample (vmap(jacfwd(f)))",
))
register(Strategy(
    name="loop_rev", ops=JACOBIAN, run=_loop_rev, memory=_loop_memory, work=_out_basis,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="one autograd.grad per output coordinate of the batch-summed output; no vmap",
))
register(Strategy(
    name="full_diag", ops=JACOBIAN, run=_full_diag, memory=_full_diag_memory,
    basis=lambda s: s.batch * s.m, chunks=(None, 64, 16, 1), coupled_only=True, autograd=True,
    summary="rows of the whole-batch Jacobian, keeping each sample's diagonal block; "
            "exact for batch-coupled f",
))


# B * m at and above which vmap over samples is first among the reverse strategies (see _heuristic).
PER_SAMPLE_ROWS = 16384


def _heuristic(s: Sizes) -> list[str]:
    # Measured on CPU (docs/design.md's grid, benchmarks/results; benchmarks/pinn.py for the engine): one
    # backward pass wins for scalar outputs (loop_rev, level with the engine's reverse mode); the
    # engine's forward mode when there are fewer inputs than outputs (its first layer's tangents are
    # the weight itself: 3-200x over vmap(jacrev)); otherwise its reverse mode, or meeting in the
    # middle, ahead of reverse mode over the batch-summed output (rows few) or per sample (rows
    # many: B=512, m=512: vmap_rev 1.7x faster than sum_rev). The order matters most for large
    # problems, where one call can spend the tuning budget.
    if s.m == 1:
        return ["loop_rev", "jet_jacobian_rev", "sum_grad", "sum_rev", "jet_jacobian_fwd", "sum_fwd", "vmap_rev",
                "vmap_fwd", "jet_jacobian_meet"]
    if s.n < s.m:
        return ["jet_jacobian_fwd", "jet_jacobian_meet", "sum_fwd", "sum_rev", "sum_grad", "jet_jacobian_rev",
                "vmap_fwd", "vmap_rev", "loop_rev"]
    if s.batch * s.m >= PER_SAMPLE_ROWS:
        return ["jet_jacobian_rev", "jet_jacobian_meet", "vmap_rev", "sum_rev", "sum_grad", "loop_rev",
                "jet_jacobian_fwd", "sum_fwd", "vmap_fwd"]
    return ["jet_jacobian_rev", "sum_rev", "sum_grad", "jet_jacobian_meet", "jet_jacobian_fwd", "sum_fwd",
            "vmap_rev", "vmap_fwd", "loop_rev"]


set_heuristic("jacobian", _heuristic)
