"""Hand-written twins of autojac's strategies: for each strategy, the leanest code a careful user
would write for the SAME computation (the same mathematical method, the same passes), in plain
torch.autograd and torch.func, without autojac.

Written independently of autojac's implementation: this module imports torch only. Everything
that can be built once (seeds, bases, identities, index tensors) is built when the twin is made,
outside the timed call, as a user would hoist it out of a loop.

Twins are keyed by strategy name (`TWINS`); `make(name, spec)` returns the timed call, or raises
`NoTwin` with the reason (no twin for that name, or a shape the twin was not written for). A
new strategy is listed as "no twin" by the benchmark until a twin is added here, with
`@twin("name")`.

Shapes: x (B, n); f(x) (B,) (a scalar per sample, m = 1) or (B, m). Results are autojac's:
jacobian, hvp, hessian_diag (B, *out, n); hessian (B, *out, n, n); laplacian (B, *out), where
*out is () for scalar outputs and (m,) otherwise. `chunk` is the strategy's chunk: basis vectors
per vectorized pass over the same basis the strategy splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.nn import functional as F

Run = Callable[[], Tensor]
autograd = torch.autograd.grad


class NoTwin(Exception):
    """No hand-written twin for this strategy or shape; the message says why."""


@dataclass(frozen=True)
class Spec:
    """One problem, as the benchmark calls the strategy: `out_shape` is f's per-sample output shape."""

    op: str
    f: Callable[[Tensor], Tensor]
    x: Tensor
    v: Tensor | None
    chunk: int | None
    out_shape: tuple[int, ...]

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.x.shape[1]

    @property
    def m(self) -> int:
        return self.out_shape[0] if self.out_shape else 1

    @property
    def scalar(self) -> bool:
        return not self.out_shape


TwinMaker = Callable[[Spec], Run]
TWINS: dict[str, dict[str, TwinMaker]] = {}  # strategy name -> op -> maker


def twin(name: str, *ops: str) -> Callable[[TwinMaker], TwinMaker]:
    """Register a maker as the twin of strategy `name` for `ops`."""
    def register(maker: TwinMaker) -> TwinMaker:
        for op in ops:
            TWINS.setdefault(name, {})[op] = maker
        return maker
    return register


def make(name: str, spec: Spec) -> Run:
    """The twin of strategy `name` for this problem; NoTwin says why there is none."""
    makers = TWINS.get(name)
    if makers is None:
        raise NoTwin("no twin")
    if spec.op not in makers:
        raise NoTwin(f"no twin for {spec.op}")
    if spec.x.dim() != 2 or len(spec.out_shape) > 1:
        raise NoTwin(f"twins are written for x (B, n) and f(x) (B,) or (B, m); got x {tuple(spec.x.shape)}, "
                     f"per-sample output {spec.out_shape}")
    return makers[spec.op](spec)


# -- what is built once ------------------------------------------------------------------------

def spans(total: int, chunk: int | None) -> list[tuple[int, int]]:
    step = total if chunk is None else max(chunk, 1)
    return [(a, min(a + step, total)) for a in range(0, total, step)]


def column_seeds(s: Spec) -> Tensor:
    """Seeds for f(x) directly: (m, B, *out), seed k is 1 at output k of every sample (ones (1, B)
    for scalar outputs)."""
    seeds = torch.zeros(s.m, s.batch, s.m, dtype=s.x.dtype, device=s.x.device)
    seeds[torch.arange(s.m), :, torch.arange(s.m)] = 1
    return seeds.reshape(s.m, s.batch, *s.out_shape).contiguous()


def summed_basis(s: Spec) -> Tensor:
    """Basis of the batch-summed output f(x).sum(0): (m, *out) (ones (1,) for scalar outputs)."""
    return torch.eye(s.m, dtype=s.x.dtype, device=s.x.device).reshape(s.m, *s.out_shape)


def input_basis(s: Spec) -> Tensor:
    """e_i broadcast over the batch: (n, B, n), materialized (a vectorized pass over a stride-0
    view is slower)."""
    eye = torch.eye(s.n, dtype=s.x.dtype, device=s.x.device)
    return eye[:, None, :].expand(s.n, s.batch, s.n).contiguous()


def f_one(s: Spec) -> Callable[[Tensor], Tensor]:
    """f on one sample (n,) -> (*out), for vmap over the batch."""
    f = s.f
    return lambda xi: f(xi[None])[0]


def rows_first(g: Tensor, s: Spec) -> Tensor:
    """(m, B, ...) -> (B, *out, ...)."""
    return g[0] if s.scalar else g.movedim(0, 1)


def leaf(x: Tensor) -> Tensor:
    return x.detach().requires_grad_()


# -- Jacobian ----------------------------------------------------------------------------------

@twin("sum_grad", "jacobian")
def _sum_grad(s: Spec) -> Run:
    # One forward, one vectorized backward seeded with e_k on every sample (no sum, no select).
    f, x0, seeds, parts = s.f, s.x, column_seeds(s), spans(s.m, s.chunk)

    def run() -> Tensor:
        x = leaf(x0)
        y = f(x)
        if len(parts) == 1:
            (g,) = autograd(y, x, seeds, is_grads_batched=True)
        else:
            g = torch.cat([autograd(y, x, seeds[a:b], retain_graph=True, is_grads_batched=True)[0]
                           for a, b in parts])
        return rows_first(g, s)

    return run


@twin("sum_rev", "jacobian")
def _sum_rev(s: Spec) -> Run:
    # torch.func.vjp of the batch-summed output, vmapped over a prebuilt basis.
    f, x, basis, parts = s.f, s.x, summed_basis(s), spans(s.m, s.chunk)

    def run() -> Tensor:
        _, pull = vjp(lambda z: f(z).sum(0), x)  # type: ignore[misc]
        if len(parts) == 1:
            (g,) = vmap(pull)(basis)
        else:
            g = torch.cat([vmap(pull)(basis[a:b])[0] for a, b in parts])
        return rows_first(g, s)

    return run


@twin("sum_fwd", "jacobian")
def _sum_fwd(s: Spec) -> Run:
    # vmap(jvp) over a prebuilt input basis broadcast over the batch: column i of every J[b].
    f, x, basis, parts = s.f, s.x, input_basis(s), spans(s.n, s.chunk)

    def push(t: Tensor) -> Tensor:
        return jvp(f, (x,), (t,))[1]

    def run() -> Tensor:
        cols = vmap(push)(basis) if len(parts) == 1 else torch.cat([vmap(push)(basis[a:b]) for a, b in parts])
        return cols.movedim(0, -1)  # (n, B, *out) -> (B, *out, n)

    return run


@twin("vmap_rev", "jacobian")
def _vmap_rev(s: Spec) -> Run:
    return _bind(vmap(jacrev(f_one(s), chunk_size=s.chunk)), s.x)


@twin("vmap_fwd", "jacobian")
def _vmap_fwd(s: Spec) -> Run:
    if s.chunk is None or s.chunk >= s.n:
        return _bind(vmap(jacfwd(f_one(s))), s.x)
    one, eye, parts = f_one(s), torch.eye(s.n, dtype=s.x.dtype, device=s.x.device), spans(s.n, s.chunk)

    def per_sample(xi: Tensor) -> Tensor:  # jacfwd has no chunks: its loop, by hand
        push = lambda t: jvp(one, (xi,), (t,))[1]  # noqa: E731
        return torch.cat([vmap(push)(eye[a:b]) for a, b in parts]).movedim(0, -1)

    return _bind(vmap(per_sample), s.x)


@twin("loop_rev", "jacobian")
def _loop_rev(s: Spec) -> Run:
    f, x0 = s.f, s.x
    if s.scalar:
        ones = torch.ones(s.batch, dtype=x0.dtype, device=x0.device)

        def run() -> Tensor:
            x = leaf(x0)
            return autograd(f(x), x, ones)[0]

        return run
    seeds, last = column_seeds(s), s.m - 1

    def run_columns() -> Tensor:
        x = leaf(x0)
        y = f(x)
        return torch.stack([autograd(y, x, seeds[k], retain_graph=k < last)[0] for k in range(s.m)], 1)

    return run_columns


@twin("full_diag", "jacobian")
def _full_diag(s: Spec) -> Run:
    # Rows of the whole-batch Jacobian, `chunk` at a time, each row's own sample's block kept.
    f, x0, rows = s.f, s.x, s.batch * s.m
    seeds = torch.eye(rows, dtype=x0.dtype, device=x0.device).reshape(rows, s.batch, *s.out_shape)
    parts = spans(rows, s.chunk)
    picks = [(torch.arange(b - a), torch.arange(a, b) // s.m) for a, b in parts]

    def run() -> Tensor:
        x = leaf(x0)
        y = f(x)
        pieces = []
        for (a, b), (lanes, samples) in zip(parts, picks):
            if b - a == 1:
                g = autograd(y, x, seeds[a], retain_graph=True)[0][None]
            else:
                g = autograd(y, x, seeds[a:b], retain_graph=True, is_grads_batched=True)[0]
            pieces.append(g[lanes, samples])  # (k, n)
        return torch.cat(pieces).reshape(s.batch, *s.out_shape, s.n)

    return run


def _bind(fn: Callable[[Tensor], Tensor], x: Tensor) -> Run:
    return lambda: fn(x)


# -- second order: reverse over reverse in plain autograd ---------------------------------------

def _direction(s: Spec) -> Tensor:
    if s.v is None:
        raise NoTwin("hvp needs a direction v")
    return s.v


def _first_level(s: Spec) -> Callable[[], tuple[Tensor, list[Tensor]]]:
    """x and each output's per-sample gradient (B, n), kept differentiable: one autograd.grad per
    output, seeded directly (ones for a scalar output, a one-hot column otherwise)."""
    f, x0 = s.f, s.x
    seeds = column_seeds(s)

    def first() -> tuple[Tensor, list[Tensor]]:
        x = leaf(x0)
        y = f(x)
        return x, [autograd(y, x, seeds[k], create_graph=True)[0] for k in range(s.m)]

    return first


@twin("sum_grad_grad", "hessian")
def _sum_grad_grad(s: Spec) -> Run:
    # Each gradient seeded with e_i on every sample, vectorized (is_grads_batched): row i of H[b, k].
    first, basis, parts = _first_level(s), input_basis(s), spans(s.n, s.chunk)

    def run() -> Tensor:
        x, grads = first()
        rows = [torch.cat([autograd(g, x, basis[a:b], retain_graph=True, is_grads_batched=True)[0]
                           for a, b in parts]) for g in grads]  # each (n, B, n)
        return rows[0].movedim(1, 0) if s.scalar else torch.stack(rows).permute(2, 0, 1, 3)

    return run


@twin("loop_grad_grad", "hessian")
def _loop_grad_grad(s: Spec) -> Run:
    first, basis = _first_level(s), input_basis(s)

    def run() -> Tensor:
        x, grads = first()
        rows = [torch.stack([autograd(g, x, basis[i], retain_graph=True)[0] for i in range(s.n)], 1)
                for g in grads]  # each (B, n, n)
        return rows[0] if s.scalar else torch.stack(rows, 1)

    return run


@twin("grad_grad_diag", "hessian_diag", "laplacian")
def _grad_grad_diag(s: Spec) -> Run:
    first, basis, parts = _first_level(s), input_basis(s), spans(s.n, s.chunk)

    def run() -> Tensor:
        x, grads = first()
        diags = []
        for g in grads:
            pieces = [autograd(g, x, basis[a:b], retain_graph=True, is_grads_batched=True)[0][:, :, a:b]
                      .diagonal(dim1=0, dim2=2) for a, b in parts]  # (c, B, c) -> (B, c)
            diags.append(torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0])
        return _finish_diag(diags, s)

    return run


@twin("loop_diag", "hessian_diag", "laplacian")
def _loop_diag(s: Spec) -> Run:
    first, basis = _first_level(s), input_basis(s)

    def run() -> Tensor:
        x, grads = first()
        diags = [torch.stack([autograd(g, x, basis[i], retain_graph=True)[0][:, i] for i in range(s.n)], 1)
                 for g in grads]
        return _finish_diag(diags, s)

    return run


def _finish_diag(diags: list[Tensor], s: Spec) -> Tensor:
    """Per output, the diagonals (B, n) -> hessian_diag (B, *out, n) or laplacian (B, *out)."""
    if s.op == "laplacian":
        traces = [d.sum(1) for d in diags]
        return traces[0] if s.scalar else torch.stack(traces, 1)
    return diags[0] if s.scalar else torch.stack(diags, 1)


@twin("hvp_rev_rev", "hvp")
def _hvp_rev_rev(s: Spec) -> Run:
    first, v, last = _first_level(s), s.v, s.m - 1

    def run() -> Tensor:
        x, grads = first()
        hv = [autograd(g, x, v, retain_graph=k < last)[0] for k, g in enumerate(grads)]
        return hv[0] if s.scalar else torch.stack(hv, 1)

    return run


# -- second order: torch.func ------------------------------------------------------------------

def _summed_gradients(s: Spec, chunk: int | None = None) -> Callable[[Tensor], Tensor]:
    """z -> every sample's gradient of each output: (B, n) for a scalar output (torch.func.grad of
    the batch sum), else (m, B, n) (vjp of the batch-summed output over a prebuilt basis)."""
    f = s.f
    if s.scalar:
        return grad(lambda z: f(z).sum())
    basis, parts = summed_basis(s), spans(s.m, chunk)

    def gradients(z: Tensor) -> Tensor:
        _, pull = vjp(lambda w: f(w).sum(0), z)  # type: ignore[misc]
        if len(parts) == 1:
            return vmap(pull)(basis)[0]
        return torch.cat([vmap(pull)(basis[a:b])[0] for a, b in parts])

    return gradients


@twin("vmap_fwd_rev", "hessian")
def _vmap_fwd_rev(s: Spec) -> Run:
    if s.chunk is None or s.chunk >= s.n:
        return _bind(vmap(hessian(f_one(s))), s.x)
    return _bind(vmap(_chunked_hessian(s)), s.x)


def _chunked_hessian(s: Spec) -> Callable[[Tensor], Tensor]:
    """One sample's Hessian, forward over reverse with `chunk` tangents per pass: (*out, n, n)."""
    gradient, eye, parts = jacrev(f_one(s)), torch.eye(s.n, dtype=s.x.dtype, device=s.x.device), spans(s.n, s.chunk)

    def per_sample(xi: Tensor) -> Tensor:
        push = lambda t: jvp(gradient, (xi,), (t,))[1]  # noqa: E731
        return torch.cat([vmap(push)(eye[a:b]) for a, b in parts]).movedim(0, -1)

    return per_sample


@twin("vmap_rev_rev", "hessian")
def _vmap_rev_rev(s: Spec) -> Run:
    return _bind(vmap(jacrev(jacrev(f_one(s)), chunk_size=s.chunk)), s.x)


@twin("sum_fwd_rev", "hessian")
def _sum_fwd_rev(s: Spec) -> Run:
    # Forward mode along e_i (broadcast over the batch) of every sample's gradient: column i of every H[b].
    gradients, x, basis, parts = _summed_gradients(s), s.x, input_basis(s), spans(s.n, s.chunk)

    def push(t: Tensor) -> Tensor:
        return jvp(gradients, (x,), (t,))[1]

    def run() -> Tensor:
        cols = vmap(push)(basis) if len(parts) == 1 else torch.cat([vmap(push)(basis[a:b]) for a, b in parts])
        # scalar: (n_i, B, n_j) -> (B, n_j, n_i); vector: (n_i, m, B, n_j) -> (B, m, n_j, n_i)
        return cols.permute(1, 2, 0) if s.scalar else cols.permute(2, 1, 3, 0)

    return run


@twin("hvp_fwd_rev", "hvp")
def _hvp_fwd_rev(s: Spec) -> Run:
    gradients, x, v = _summed_gradients(s, s.chunk), s.x, s.v

    def run() -> Tensor:
        hv = jvp(gradients, (x,), (v,))[1]  # (B, n), or (m, B, n)
        return hv if s.scalar else hv.movedim(0, 1)

    return run


@twin("hvp_rev_fwd", "hvp")
def _hvp_rev_fwd(s: Spec) -> Run:
    f, x, v = s.f, s.x, s.v
    if s.scalar:
        directional = grad(lambda z: jvp(f, (z,), (v,))[1].sum())
        return _bind(directional, x)
    basis, parts = summed_basis(s), spans(s.m, s.chunk)

    def run() -> Tensor:
        _, pull = vjp(lambda z: jvp(f, (z,), (v,))[1].sum(0), x)  # type: ignore[misc]
        g = vmap(pull)(basis)[0] if len(parts) == 1 else torch.cat([vmap(pull)(basis[a:b])[0] for a, b in parts])
        return g.movedim(0, 1)

    return run


@twin("fwd_fwd_diag", "hessian_diag", "laplacian")
def _fwd_fwd_diag(s: Spec) -> Run:
    f, x, basis, parts = s.f, s.x, input_basis(s), spans(s.n, s.chunk)

    def second(t: Tensor) -> Tensor:  # t^T H[b] t for every sample: (B, *out)
        return jvp(lambda z: jvp(f, (z,), (t,))[1], (x,), (t,))[1]

    return _along_basis(second, basis, parts, s)


@twin("hvp_diag", "hessian_diag", "laplacian")
def _hvp_diag(s: Spec) -> Run:
    gradients, x, basis, parts = _summed_gradients(s), s.x, input_basis(s), spans(s.n, s.chunk)

    def second(t: Tensor) -> Tensor:  # coordinate i of the HVP along e_i: (B,) or (m, B)
        return jvp(lambda z: (gradients(z) * t).sum(-1), (x,), (t,))[1]

    return _along_basis(second, basis, parts, s, transposed=not s.scalar)


def _along_basis(second: Callable[[Tensor], Tensor], basis: Tensor, parts: list[tuple[int, int]], s: Spec,
                 transposed: bool = False) -> Run:
    """vmap `second` over the input basis, in spans: each gives (B, *out) (or (m, B) if
    `transposed`) per basis vector; the diagonal (B, *out, n) or its sum (B, *out)."""
    laplacian = s.op == "laplacian"

    def run() -> Tensor:
        if laplacian:
            sums = [vmap(second)(basis).sum(0)] if len(parts) == 1 else [vmap(second)(basis[a:b]).sum(0)
                                                                           for a, b in parts]
            total = sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)
            return total.t() if transposed else total
        d = vmap(second)(basis) if len(parts) == 1 else torch.cat([vmap(second)(basis[a:b]) for a, b in parts])
        return d.permute(2, 1, 0) if transposed else d.movedim(0, -1)  # -> (B, *out, n)

    return run


@twin("vmap_hessian_diag", "hessian_diag", "laplacian")
def _vmap_hessian_diag(s: Spec) -> Run:
    per_sample = hessian(f_one(s)) if s.chunk is None or s.chunk >= s.n else _chunked_hessian(s)
    batched, x = vmap(per_sample), s.x
    if s.op == "laplacian":
        return lambda: batched(x).diagonal(dim1=-2, dim2=-1).sum(-1)
    return lambda: batched(x).diagonal(dim1=-2, dim2=-1)


# -- second order for batch-coupled f: diagonal blocks of whole-batch derivatives ---------------

def _own_sample_first(s: Spec) -> Callable[[Tensor, Tensor, int, int], Tensor]:
    """(x, y, a, b) -> the own-sample gradients of entries a..b of y.reshape(-1): (b - a, n), kept
    differentiable."""
    rows = s.batch * s.m
    seeds = torch.eye(rows, dtype=s.x.dtype, device=s.x.device).reshape(rows, s.batch, *s.out_shape)
    samples = torch.arange(rows, device=s.x.device) // s.m

    def first(x: Tensor, y: Tensor, a: int, b: int) -> Tensor:
        if b - a == 1:
            return autograd(y, x, seeds[a], create_graph=True)[0][samples[a]][None]
        g = autograd(y, x, seeds[a:b], create_graph=True, is_grads_batched=True)[0]
        return g[torch.arange(b - a), samples[a:b]]

    return first


def _own_sample_second(values: Tensor, samples: Tensor, x: Tensor, chunk: int | None,
                       eye: Tensor) -> Tensor:
    """Gradient of each of values (R,) w.r.t. x, the block of its own sample: (R, n)."""
    pieces = []
    for a, b in spans(values.numel(), chunk):
        if b - a == 1:
            g = autograd(values[a], x, retain_graph=True)[0][None]
        else:
            g = autograd(values, x, eye[a:b, : values.numel()], retain_graph=True, is_grads_batched=True)[0]
        pieces.append(g[torch.arange(b - a), samples[a:b]])
    return torch.cat(pieces)


@twin("full_hessian", "hessian", "hessian_diag", "laplacian")
def _full_hessian(s: Spec) -> Run:
    # Per span of `chunk` output entries: their own-sample gradients, each of whose n entries is
    # differentiated again (own sample), `chunk` at a time.
    f, x0, n, rows = s.f, s.x, s.n, s.batch * s.m
    first = _own_sample_first(s)
    width = (s.chunk or rows) * n
    eye = torch.eye(width, dtype=x0.dtype, device=x0.device)
    samples = torch.arange(rows, device=x0.device) // s.m

    def run() -> Tensor:
        x = leaf(x0)
        y = f(x)
        pieces = []
        for a, b in spans(rows, s.chunk):
            g = first(x, y, a, b)  # (k, n)
            pieces.append(_own_sample_second(g.reshape(-1), samples[a:b].repeat_interleave(n), x, s.chunk, eye))
        h = torch.cat(pieces).reshape(s.batch, *s.out_shape, n, n)
        if s.op == "hessian":
            return h
        d = h.diagonal(dim1=-2, dim2=-1)
        return d.sum(-1) if s.op == "laplacian" else d

    return run


@twin("full_hvp", "hvp")
def _full_hvp(s: Spec) -> Run:
    f, x0, v, rows = s.f, s.x, _direction(s), s.batch * s.m
    first = _own_sample_first(s)
    eye = torch.eye(s.chunk or rows, dtype=x0.dtype, device=x0.device)
    samples = torch.arange(rows, device=x0.device) // s.m

    def run() -> Tensor:
        x = leaf(x0)
        y = f(x)
        pieces = []
        for a, b in spans(rows, s.chunk):
            directional = (first(x, y, a, b) * v[samples[a:b]]).sum(-1)  # (k,)
            pieces.append(_own_sample_second(directional, samples[a:b], x, None, eye))
        return torch.cat(pieces).reshape(s.batch, *s.out_shape, s.n)

    return run


# -- forward propagation through an nn.Sequential of Linear and tanh/sigmoid -------------------

def _layers(s: Spec) -> list[nn.Module]:
    if type(s.f) is not nn.Sequential:
        raise NoTwin("the hand-written forward pass is for an nn.Sequential of Linear, Tanh and Sigmoid")
    layers = list(s.f)
    if not all(type(layer) in (nn.Linear, nn.Tanh, nn.Sigmoid) for layer in layers):
        raise NoTwin("the hand-written forward pass is for an nn.Sequential of Linear, Tanh and Sigmoid")
    return layers


def _derivatives(layer: nn.Module, a: Tensor) -> tuple[Tensor, Tensor]:
    """s'(z), s''(z) from a = s(z)."""
    if type(layer) is nn.Tanh:
        d1 = 1 - a * a
        return d1, -2 * a * d1
    d1 = a * (1 - a)
    return d1, d1 * (1 - 2 * a)


@twin("jet_laplacian", "hessian_diag", "laplacian")
@twin("jet_hessian", "hessian")
@twin("jet_hvp", "hvp")
def _forward(s: Spec) -> Run:
    # The engine's forward Taylor mode written by hand for an nn.Sequential of Linear and Tanh or
    # Sigmoid (the forward Laplacian of Li et al.): what the engine computes for such a model.
    # Carries h (B, d), J = dh/dx ((n, d) while shared by every sample, then (B, n, d)) and the
    # second-order term S of the operation, under no_grad: an inference-time forward pass.
    layers, x, op = _layers(s), s.x, s.op
    v = _direction(s) if op == "hvp" else x
    identity = torch.eye(s.n, dtype=x.dtype, device=x.device)
    lead = {"laplacian": 0, "hessian_diag": 1, "hvp": 1, "hessian": 2}[op]  # dims of S between B and d

    def products(jac: Tensor) -> Tensor:
        if op == "laplacian":
            return (jac * jac).sum(-2)
        if op == "hessian_diag":
            return jac * jac
        if op == "hvp":
            direction = v @ jac if jac.dim() == 2 else torch.bmm(v[:, None, :], jac)[:, 0]  # J^T v (B, d)
            return jac * direction[:, None, :]
        return jac[..., :, None, :] * jac[..., None, :, :]

    def run() -> Tensor:
        with torch.no_grad():
            h, jac, second = x, None, None
            for layer in layers:
                if type(layer) is nn.Linear:
                    h = F.linear(h, layer.weight, layer.bias)
                    wt = layer.weight.t()
                    jac = wt if jac is None else jac @ wt
                    second = None if second is None else second @ wt
                    continue
                a = layer(h)
                d1, d2 = _derivatives(layer, a)
                shape = (d1.shape[0], *(1,) * lead, d1.shape[1])
                jac = identity if jac is None else jac
                term = d2.view(shape) * products(jac)
                second = term if second is None else term + d1.view(shape) * second
                jac = d1[:, None, :] * jac
                h = a
            if second is None:
                raise ValueError("an affine f: its second derivatives vanish")
            return second if op == "laplacian" else second.movedim(-1, 1)

    return run


# -- divergence: the trace of each square Jacobian (m = n) ----------------------------------------

def _square(s: Spec) -> None:
    if s.out_shape != (s.n,):
        raise NoTwin(f"the divergence needs f (B, n) -> (B, n); got per-sample output {s.out_shape}")


@twin("div_rows", "divergence")
def _div_rows(s: Spec) -> Run:
    # Output coordinate i seeded on every sample: row i of every J[b], of which entry i is kept.
    _square(s)
    f, x0, basis, parts = s.f, s.x, input_basis(s), spans(s.n, s.chunk)

    def run() -> Tensor:
        x = leaf(x0)
        y = f(x)
        total = 0
        for a, b in parts:
            rows = autograd(y, x, basis[a:b], retain_graph=b < s.n, is_grads_batched=True)[0]  # (c, B, n)
            total = total + rows[:, :, a:b].diagonal(dim1=0, dim2=2).sum(-1)
        return total

    return run


@twin("div_loop", "divergence")
def _div_loop(s: Spec) -> Run:
    _square(s)
    f, x0, basis, last = s.f, s.x, input_basis(s), s.n - 1

    def run() -> Tensor:
        x = leaf(x0)
        y = f(x)
        return sum(autograd(y, x, basis[i], retain_graph=i < last)[0][:, i] for i in range(s.n))

    return run


@twin("div_fwd", "divergence")
def _div_fwd(s: Spec) -> Run:
    # jvp along e_i on every sample, output entry i kept.
    _square(s)
    f, x, eye, parts = s.f, s.x, torch.eye(s.n, dtype=s.x.dtype, device=s.x.device), spans(s.n, s.chunk)
    push = lambda t: jvp(f, (x,), (t.expand_as(x),))[1]  # noqa: E731

    def run() -> Tensor:
        return sum(vmap(push)(eye[a:b])[:, :, a:b].diagonal(dim1=0, dim2=2).sum(-1) for a, b in parts)

    return run


# -- derivatives: value, Jacobian and Laplacian together, as a PINN residual needs them ------------

@twin("nested_derivatives", "derivatives")
def _nested_derivatives(s: Spec) -> Run:
    # One forward pass, one backward per output (kept differentiable), one vectorized backward per
    # output over the input basis, the diagonal kept.
    f, x0, seeds, basis, parts = s.f, s.x, column_seeds(s), input_basis(s), spans(s.n, s.chunk)

    def run() -> tuple[Tensor, Tensor, Tensor]:
        x = leaf(x0)
        y = f(x)
        grads = [autograd(y, x, seeds[k], create_graph=True)[0] for k in range(s.m)]
        laps = [sum(autograd(g, x, basis[a:b], retain_graph=True, is_grads_batched=True)[0][:, :, a:b]
                    .diagonal(dim1=0, dim2=2).sum(-1) for a, b in parts) for g in grads]
        if s.scalar:
            return y.detach(), grads[0].detach(), laps[0].detach()
        return y.detach(), torch.stack(grads, 1).detach(), torch.stack(laps, 1).detach()

    return run


@twin("vmap_derivatives", "derivatives")
def _vmap_derivatives(s: Spec) -> Run:
    one = f_one(s)

    def with_value(z: Tensor) -> tuple[Tensor, Tensor]:
        y = one(z)
        return y, y

    def jacobian_and_value(z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        jac, y = jacrev(with_value, has_aux=True)(z)
        return jac, (jac, y)

    def per_sample(xi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hess, (jac, y) = jacfwd(jacobian_and_value, has_aux=True)(xi)
        return y, jac, hess.diagonal(dim1=-2, dim2=-1).sum(-1)

    return _bind(vmap(per_sample), s.x)  # type: ignore[arg-type]
