"""Building blocks shared by strategies: Jacobians of a function along a (chunked) basis.

`vjp_basis` gives all rows of a Jacobian by vector-Jacobian products, `jvp_basis` all columns
by Jacobian-vector products, each vectorized with vmap over `chunk` basis vectors at a time.
The basis is built chunk by chunk, so the (n, n) identity never exists unless chunk is None.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

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


# Seeds and bases are cached process-wide, so that a plan's calls reuse them: tensors up to
# _CACHED_BYTES each, SEED_CACHE_BYTES in all, the least recently used dropped first (a server
# answering every batch size from 1 to 128 keeps a few MB, not one seed per size).
_CACHED_BYTES = 4 * 2**20
SEED_CACHE_BYTES = 16 * 2**20
_seeds: collections.OrderedDict[tuple[Any, ...], tuple[Any, int]] = collections.OrderedDict()
_seeds_total = [0]
_seeds_lock = threading.Lock()


def _cached(key: tuple[Any, ...], make: Callable[[], Any], size: int) -> Any:
    """The seed made by `make` (of `size` bytes), from the cache if there; kept if it fits."""
    with _seeds_lock:
        found = _seeds.get(key)
        if found is not None:
            _seeds.move_to_end(key)
            return found[0]
    with torch.inference_mode(False), torch.no_grad():  # a cached seed must serve every mode
        made = make()
    if size > _CACHED_BYTES:
        return made
    with _seeds_lock:
        if key not in _seeds:
            _seeds[key] = (made, size)
            _seeds_total[0] += size
            while _seeds_total[0] > SEED_CACHE_BYTES and _seeds:
                _, (_, dropped) = _seeds.popitem(last=False)
                _seeds_total[0] -= dropped
    return made


def one_hot_rows(start: int, stop: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Basis vectors e_start .. e_{stop-1} of a space of `shape`: (stop - start, *shape). Cached: never
    write into it.

    Made in its final shape, not as a view: a view as the seeds of a vectorized backward pass
    costs some 40 µs more per call (measured on the seed problem, where the pass takes 200)."""
    shape = tuple(shape)
    size = (stop - start) * math.prod(shape) * like.element_size()
    return _cached(("rows", start, stop, shape, like.dtype, like.device),
                   lambda: _make_one_hot_rows(start, stop, shape, like.dtype, like.device), size)


def _make_one_hot_rows(start: int, stop: int, shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> Tensor:
    rows = torch.zeros(stop - start, *shape, dtype=dtype, device=device)
    index = torch.arange(stop - start, device=device)
    rows.view(stop - start, -1)[index, index + start] = 1
    return rows


def ones_seed(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Ones of `shape`, the seed of a per-sample scalar output's gradient (materialized up to
    _MATERIALIZED_BYTES, 3-5% faster at B=1024-4096; an expanded scalar beyond). Cached: never
    write into it."""
    shape = tuple(shape)
    size = math.prod(shape) * like.element_size()
    small = size <= _MATERIALIZED_BYTES

    def make() -> Tensor:
        one = torch.ones((), dtype=like.dtype, device=like.device)
        return one.expand(shape).contiguous() if small else one.expand(shape)

    return _cached(("ones", shape, like.dtype, like.device), make, size if small else 0)


# Seeds broadcast over the batch are materialized up to this size: a vectorized backward pass
# over a stride-0 view is 6-30% slower for small and medium sizes (B=128, 64 -> 16: 1.29x), and
# faster beyond (B=512, 16 -> 64, 8 MB of seeds: 0.67x), where the view also saves the memory.
_MATERIALIZED_BYTES = 2 * 2**20


def broadcast_rows(start: int, stop: int, shape: tuple[int, ...], batch: int, like: Tensor) -> Tensor:
    """one_hot_rows of a per-sample space, the same for every sample: (stop - start, B, *shape).
    As seeds of one vectorized backward pass through a batch-independent f's output (B, *shape),
    they give row i of every sample's Jacobian at once (the batch trick). Cached: never write
    into it."""
    shape = tuple(shape)
    size = (stop - start) * batch * math.prod(shape) * like.element_size()
    rows = one_hot_rows(start, stop, shape, like)
    if size > _MATERIALIZED_BYTES:
        return rows.unsqueeze(1).expand(stop - start, batch, *shape)
    return _cached(("broadcast", start, stop, shape, batch, like.dtype, like.device),
                   lambda: rows.unsqueeze(1).expand(stop - start, batch, *shape).contiguous(), size)


def chosen_seeds(directions: tuple[int, ...], shape: tuple[int, ...], batch: int, like: Tensor) -> Tensor:
    """Basis vectors e_d of a per-sample space of `shape`, for d in `directions` (flat indices), the
    same for every sample: (k, B, *shape). Cached: never write into it."""
    directions, shape = tuple(directions), tuple(shape)

    def make() -> Tensor:
        rows = torch.zeros(len(directions), math.prod(shape), dtype=like.dtype, device=like.device)
        rows[torch.arange(len(directions), device=like.device), torch.tensor(directions, device=like.device)] = 1
        return rows.view(len(directions), 1, *shape).expand(len(directions), batch, *shape).contiguous()

    size = len(directions) * batch * math.prod(shape) * like.element_size()
    return _cached(("chosen", directions, shape, batch, like.dtype, like.device), make, size)


def row_seeds(shape: tuple[int, ...], batch: int, like: Tensor) -> tuple[Tensor, ...]:
    """broadcast_rows for every row, one seed at a time: m seeds (B, *shape) for a loop of backward
    passes over the output coordinates. Cached."""
    shape = tuple(shape)
    rows = broadcast_rows(0, math.prod(shape), shape, batch, like)
    return _cached(("row seeds", shape, batch, like.dtype, like.device), lambda: tuple(rows.unbind(0)), 0)


def vjp_basis(fn: Fn, primal: Tensor, chunk: int | None) -> Tensor:
    """Jacobian of fn at primal by reverse mode: (*fn(primal).shape, *primal.shape)."""
    out, pullback = vjp(fn, primal)  # type: ignore[misc]  # annotated with has_aux's triple too
    if out.numel() == 0:
        return primal.new_zeros(*out.shape, *primal.shape)
    pieces = [
        vmap(pullback)(one_hot_rows(start, stop, tuple(out.shape), out))[0]
        for start, stop in spans(out.numel(), chunk)
    ]
    return joined(pieces).reshape(*out.shape, *primal.shape)


def batch_vjp_rows(fn: Fn, primal: Tensor, chunk: int | None) -> Tensor:
    """Every sample's Jacobian of a batch-independent fn (B, *in) -> (B, *out) by reverse mode,
    row by row: (*out, B, *in), one vector-Jacobian product seeded with output coordinate i on
    every sample per row, vectorized `chunk` rows at a time. A torch.func function of primal,
    so it can be differentiated again."""
    out, pullback = vjp(fn, primal)  # type: ignore[misc]  # annotated with has_aux's triple too
    batch, out_shape = out.shape[0], tuple(out.shape[1:])
    m = math.prod(out_shape)
    if out.numel() == 0:
        return primal.new_zeros(*out_shape, *primal.shape)
    if m == 1:
        rows = pullback(ones_seed(tuple(out.shape), out))[0]
    else:
        rows = joined([vmap(pullback)(broadcast_rows(start, stop, out_shape, batch, out))[0]
                       for start, stop in spans(m, chunk)])
    return rows.view(*out_shape, *primal.shape)


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
    return columns.movedim(0, -1).unflatten(-1, shape) if shape else columns.movedim(0, -1).squeeze(-1)


def one_sample(f: Fn) -> Fn:
    """f on a single sample: (*in) -> (*out), for vmap over the batch."""

    def f_one(xi: Tensor) -> Tensor:
        return f(xi.unsqueeze(0)).squeeze(0)

    return f_one


def per_sample(p: Problem, transform: Callable[[Fn], Fn]) -> Tensor:
    """vmap over the samples of transform(f_one)(x[b]), where f_one maps one sample (*in) -> (*out)
    with that sample's own extra arguments (those with a batch dimension in p.arg_dims)."""
    if not p.args:
        return vmap(transform(one_sample(p.f)))(p.x)
    base, dims = p.base, p.arg_dims
    assert base is not None

    def body(xi: Tensor, *args: Any) -> Tensor:
        batched = tuple(a if d is None else a.unsqueeze(d) for a, d in zip(args, dims))
        return transform(lambda z: base(z.unsqueeze(0), *batched).squeeze(0))(xi)

    return vmap(body, in_dims=(0, *dims))(p.x, *p.args)


def grad_input(problem: Problem) -> Tensor:
    """The tensor to differentiate with respect to, without touching the caller's x.

    With create_graph and an x that requires grad, x itself (so the result stays in its
    graph); otherwise a detached alias that requires grad.
    """
    x = problem.x
    if problem.create_graph and x.requires_grad:
        return x.view_as(x)
    return x.detach().requires_grad_(True)


def vjp_of(outputs: Tensor, x: Tensor, seed: Tensor, *, retain: bool, create_graph: bool,
           batched: bool = False) -> Tensor:
    """torch.autograd.grad of outputs w.r.t. x seeded with `seed` (with `batched`, a stack of seeds
    (k, *outputs.shape), vectorized): (*x.shape), or (k, *x.shape); zeros where outputs do not
    depend on x."""
    (grad,) = torch.autograd.grad(outputs, x, seed, retain_graph=retain or create_graph, create_graph=create_graph,
                                  is_grads_batched=batched, allow_unused=True)
    if grad is None:
        return x.new_zeros(*seed.shape[:1], *x.shape) if batched else torch.zeros_like(x)
    if batched and grad.dim() == x.dim():  # the zeros of an output that ignores x come unbatched
        grad = grad.expand(seed.shape[0], *grad.shape)
    return grad


def batched_grad(outputs: Tensor, x: Tensor, seeds: Tensor, create_graph: bool) -> Tensor:
    """Vector-Jacobian products of outputs w.r.t. x for each seed in seeds (k, *outputs.shape):
    (k, *x.shape), vectorized; a single seed skips vmap. The graph is kept for more."""
    if seeds.shape[0] == 1:
        return vjp_of(outputs, x, seeds[0], retain=True, create_graph=create_graph)[None]
    return vjp_of(outputs, x, seeds, retain=True, create_graph=create_graph, batched=True)


def output_rows(y: Tensor, x: Tensor, chunk: int | None, create_graph: bool, *, retain: bool = False) -> Tensor:
    """The batch trick in reverse, in plain autograd: row i of every sample's Jacobian of y (B, *out)
    w.r.t. x, from one backward pass seeded with output coordinate i on every sample, vectorized
    `chunk` rows at a time: (m, B, *in). No node is added to f's graph (the seeds go straight to
    y), and the graph is freed after the last pass unless `retain` or create_graph."""
    batch, out_shape = y.shape[0], tuple(y.shape[1:])
    m = math.prod(out_shape)
    if m == 1:
        return vjp_of(y, x, ones_seed(tuple(y.shape), y), retain=retain, create_graph=create_graph).unsqueeze(0)
    pieces = []
    for start, stop in spans(m, chunk):
        seeds = broadcast_rows(start, stop, out_shape, batch, y)
        keep = retain or stop < m
        pieces.append(vjp_of(y, x, seeds[0], retain=keep, create_graph=create_graph).unsqueeze(0) if stop - start == 1
                      else vjp_of(y, x, seeds, retain=keep, create_graph=create_graph, batched=True))
    return joined(pieces)


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
