"""Divergence of a vector field (B,): the trace of each square per-sample Jacobian.

Each strategy computes only what the trace needs where it can: along input direction e_i (on
every sample at once, the batch trick) it keeps output entry i. Sizes: B samples, n input (=
output) elements per sample; c the directions handled per vectorized pass.
Hutchinson's stochastic estimate (`hutchinson`) is here too, though it is never a candidate:
it changes the answer, so only the caller chooses it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vmap

from ..problem import Problem, Sizes
from .basis import broadcast_rows, grad_input, one_hot_rows, own_sample_rows, spans, vjp_of
from .registry import BATCH_INDEPENDENT, Strategy, register, set_heuristic

DIVERGENCE = frozenset({"divergence"})


def _square(p: Problem, y: Tensor) -> None:
    if tuple(y.shape[1:]) != p.in_shape:
        raise ValueError(f"the divergence needs f's per-sample output shape to equal its input's: f maps (B, "
                         f"*{p.in_shape}) to {tuple(y.shape)}. For other outputs use autojac.jacobian")


def _own_trace(rows: Tensor, start: int, stop: int, batch: int) -> Tensor:
    """From rows (c, B, *in) of every sample's Jacobian along e_start .. e_stop-1, the sum of entry
    i of row i: (B,)."""
    return rows.reshape(stop - start, batch, -1)[:, :, start:stop].diagonal(dim1=0, dim2=2).sum(-1)


def _rows(p: Problem, chunk: int | None) -> Tensor:
    # Reverse mode in plain autograd: output coordinate i seeded on every sample gives row i of
    # every J[b]; its entry i is kept. `chunk` rows per vectorized backward pass.
    x = grad_input(p)
    y = p.f(x)
    _square(p, y)
    if not y.requires_grad:
        return x.new_zeros(p.batch)
    total: Tensor | None = None
    for start, stop in spans(p.n, chunk):
        seeds = broadcast_rows(start, stop, p.in_shape, p.batch, y)
        keep = stop < p.n
        rows = (vjp_of(y, x, seeds[0], retain=keep, create_graph=p.create_graph).unsqueeze(0) if stop - start == 1
                else vjp_of(y, x, seeds, retain=keep, create_graph=p.create_graph, batched=True))
        trace = _own_trace(rows, start, stop, p.batch)
        total = trace if total is None else total + trace
    assert total is not None
    return total


def _loop(p: Problem, chunk: int | None) -> Tensor:
    # One plain autograd.grad per coordinate, no vmap anywhere: the least memory.
    return _rows(p, 1)


def _forward(p: Problem, chunk: int | None) -> Tensor:
    # Forward mode: the jvp along e_i (on every sample at once) keeps its output entry i.
    def push(tangent: Tensor) -> Tensor:
        y, column = jvp(p.f, (p.x,), (tangent.expand_as(p.x),))  # type: ignore[misc]  # annotated with has_aux's triple too
        _square(p, y)
        return column

    total: Tensor | None = None
    for start, stop in spans(p.n, chunk):
        columns = vmap(push)(one_hot_rows(start, stop, p.in_shape, p.x))  # (c, B, *out)
        trace = _own_trace(columns, start, stop, p.batch)
        total = trace if total is None else total + trace
    assert total is not None
    return total


def _full(p: Problem, chunk: int | None) -> Tensor:
    # Batch-coupled f: the own-sample blocks of the whole-batch Jacobian, then their traces.
    x = grad_input(p)
    y = p.f(x)
    _square(p, y)
    blocks = own_sample_rows(y, x, chunk, p.create_graph)  # (B, *in, *in)
    return blocks.reshape(p.batch, p.n, p.n).diagonal(dim1=1, dim2=2).sum(-1)


def hutchinson(p: Problem, samples: int, generator: torch.Generator | None) -> Tensor:
    """Hutchinson's estimate of every sample's divergence, (B,): mean over `samples` Rademacher
    probes eps of eps^T J[b] eps, by one vectorized vector-Jacobian product. Unbiased also for a
    batch-coupled f (the probes of different samples are independent). Needs grad mode."""
    x = grad_input(p)
    y = p.f(x)
    _square(p, y)
    if not y.requires_grad:
        return x.new_zeros(p.batch)
    device = generator.device if generator is not None else x.device
    signs = torch.randint(0, 2, (samples, *x.shape), generator=generator, device=device)
    probes = (2 * signs - 1).to(dtype=y.dtype, device=y.device)
    if samples == 1:
        grads = vjp_of(y, x, probes[0], retain=False, create_graph=p.create_graph).unsqueeze(0)
    else:
        grads = vjp_of(y, x, probes, retain=False, create_graph=p.create_graph, batched=True)
    return (grads * probes).reshape(samples, p.batch, p.n).sum(-1).mean(0)


def _memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.n
    return s.activations * (1 + c) + s.tensor(c, s.batch, s.n)


def _full_memory(s: Sizes, chunk: int | None) -> int:
    c = chunk or s.batch * s.n
    return s.activations + c * (s.activations + s.tensor(s.batch, s.n)) + s.tensor(s.batch, s.n, s.n)


def _directions(s: Sizes) -> int:
    return s.n


register(Strategy(
    name="div_rows", ops=DIVERGENCE, run=_rows, memory=_memory, basis=_directions,
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="reverse mode in plain autograd, output coordinate i seeded on every sample, entry i kept",
))
register(Strategy(
    name="div_loop", ops=DIVERGENCE, run=_loop, memory=lambda s, c: _memory(s, 1),
    needs=frozenset({BATCH_INDEPENDENT}), autograd=True,
    summary="one autograd.grad per coordinate, entry i kept; no vmap",
))
register(Strategy(
    name="div_fwd", ops=DIVERGENCE, run=_forward, memory=_memory, basis=_directions,
    needs=frozenset({BATCH_INDEPENDENT}),
    summary="forward mode along each input basis vector broadcast over the batch, output entry i kept",
))
register(Strategy(
    name="full_divergence", ops=DIVERGENCE, run=_full, memory=_full_memory,
    basis=lambda s: s.batch * s.n, chunks=(None, 64, 16, 1), coupled_only=True, autograd=True,
    summary="traces of the own-sample blocks of the whole-batch Jacobian; exact for batch-coupled f",
))


def _heuristic(s: Sizes) -> list[str]:
    # Every exact strategy makes n passes; plain autograd has the least overhead per pass.
    return ["jet_divergence", "div_rows", "div_fwd", "div_loop"]


set_heuristic("divergence", _heuristic)
