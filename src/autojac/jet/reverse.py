"""Reverse mode from the same rules: Jacobians in reverse mode and meeting in the middle, and
second-order quantities by weighting each operation's curvature with the output's adjoint.

Reverse mode interprets f once, keeping a tape of each traced operation's maps (its derivative
w.r.t. each traced input), then carries adjoint stacks from the output back to the input through
the maps' transposes: one stack per output direction, (m, *b), starting from e_j broadcast over
the batch (so the last layer's adjoint is its weight, not a product).

Meeting in the middle carries the input's directions forward up to a cut of f (a traced value
that every path from x to the output goes through: a layer of a chain), the output's directions
back down to it, and finishes with one batched product per sample: J = A^T T. At the cut chosen
for the sizes, forward costs n x (the work below it), reverse m x (the work above), and the
product n m w for a cut of width w.

Both contract per sample at an inner value (the cut; each operation with a second-order term), so
they need to know where the batch is in it: first in a layer's output, second in `W @ x.T`, nowhere
in `x.reshape(-1)`. `analyse` finds out once per f and shape (`Layout`), and a call whose values do
not have the batch where it was found is refused (Unsupported: a generic strategy computes it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import memory
from .interpreter import BYPASS, Interpreter, Jet, Memo, run
from .maps import Map
from .order import Order
from .stacks import Unsupported, add, expanded, lift

Tape = list[tuple[int, list[tuple[int, Map]]]]


def _one_hot(start: int, stop: int, like: Tensor) -> Tensor:
    """e_start .. e_{stop-1} of like's per-sample space, the same for every sample: (k, 1, *out)."""
    shape = like.shape[1:]
    k = stop - start
    rows = torch.zeros(k, math.prod(shape), dtype=like.dtype, device=like.device)
    rows[torch.arange(k, device=like.device), torch.arange(start, stop, device=like.device)] = 1
    return rows.view(k, 1, *shape)


def sweep(tape: Tape, top: int, seed: Tensor, bottom: int) -> Tensor | None:
    """Carry the adjoint stack `seed` of node `top` back to node `bottom`: its adjoint stack, or
    None if `top` does not depend on it."""
    adjoints: dict[int, Tensor] = {top: seed}
    for node, links in reversed(tape[bottom + 1: top + 1]):
        adjoint = adjoints.pop(node, None)
        if adjoint is None:
            continue
        for source, m in links:
            adjoints[source] = add(adjoints.get(source), m.transpose(adjoint))  # type: ignore[assignment]
    return adjoints.get(bottom)


def _spans(total: int, chunk: int | None) -> list[tuple[int, int]]:
    step = total if chunk is None else max(chunk, 1)
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def reverse_jacobian(f: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None = None) -> Tensor:
    """(B, *out, *in) in reverse mode: one interpretation of f, then `chunk` output directions per
    sweep back through the tape."""
    interpreter = Interpreter(None, record=True)
    y, jet = run(f, x, interpreter, None)
    m = math.prod(y.shape[1:])
    if jet is None or m == 0:
        return x.new_zeros(*y.shape, *x.shape[1:])
    tape = interpreter.tape
    assert tape is not None
    rows = []
    for start, stop in _spans(m, chunk):
        adjoint = sweep(tape, jet.node, _one_hot(start, stop, y), 0)
        rows.append(x.new_zeros(stop - start, *x.shape) if adjoint is None else expanded(adjoint, x.shape))
    jac = rows[0] if len(rows) == 1 else torch.cat(rows)  # (m, B, *in)
    if 0 in jac.stride():
        jac = jac.contiguous()
    return jac.movedim(0, 1).reshape(*y.shape, *x.shape[1:])


@dataclass(frozen=True)
class Cut:
    """Where forward and reverse mode meet: the value at tape node `index` of f (x is the 0th), of
    per-sample shape `shape`, its batch along dimension `batch_dim`."""

    index: int
    shape: tuple[int, ...]
    batch_dim: int = 0


class Layout:
    """Where the batch is in each value of f, by tape node, as `analyse` found it: the dimension
    whose entries follow x's samples when their order is reversed (None: no dimension does, as in a
    flattened batch). Without a recording on two samples (f ran on one), the batch is taken to be
    first wherever a value's first dimension has the batch's size."""

    def __init__(self, dims: dict[int, int | None] | None = None, shapes: dict[int, tuple[int, ...]] | None = None):
        self.dims = dims  # node -> its batch dimension; None: not recorded
        self.shapes = shapes or {}  # node -> the value's per-sample shape (its shape less the batch dimension)

    def batch_dim(self, node: int, shape: torch.Size, batch: int) -> int | None:
        """The batch dimension of the value at `node`, of `shape` in this call on `batch` samples (None:
        one sample, the whole value is its). Raises Unsupported where the value holds no batch
        dimension, or is not the one recorded (f took another path)."""
        if batch == 1:
            return None
        if self.dims is None:
            if shape and shape[0] == batch:
                return 0
            raise Unsupported(f"f computes a value of shape {tuple(shape)} whose first dimension is not the batch "
                              f"({batch}): the engine's adjoint forms need it there")
        if node not in self.dims:
            raise Unsupported(f"f took another path than the one recorded (more values, one of shape {tuple(shape)})")
        d = self.dims[node]
        if d is None:
            raise Unsupported(f"f computes a value of shape {tuple(shape)} that holds the batch in no dimension of its "
                              f"own (a flattened batch): the engine's adjoint forms need one")
        if len(shape) <= d or shape[d] != batch or _without(shape, d) != self.shapes.get(node):
            raise Unsupported(f"f took another path than the one recorded (a value of shape {tuple(shape)}, not "
                              f"{self.shapes.get(node)} with the batch in dimension {d})")
        return d


def _without(shape: torch.Size | tuple[int, ...], d: int) -> tuple[int, ...]:
    return tuple(size for i, size in enumerate(shape) if i != d)


@dataclass(frozen=True)
class Structure:
    """What a recorded interpretation of f shows: its cuts (in order), the work of its operations
    per direction and sample up to each traced value (prefix sums), and where each value holds
    the batch."""

    cuts: tuple[Cut, ...]
    work_before: tuple[int, ...]  # by traced value: the work of every operation up to it
    total: int  # the work of every operation
    out_numel: int  # elements of f's output per sample
    layout: Layout = field(default_factory=Layout)

    def best(self, n: int, m: int) -> tuple[Cut | None, float, float, float]:
        """The inner cut that costs least, and the estimated costs (meet, forward, reverse)."""
        forward, reverse = n * self.total, m * self.total
        best, cost = None, math.inf
        for cut in self.cuts:
            below = self.work_before[cut.index]
            estimate = n * below + m * (self.total - below) + n * m * math.prod(cut.shape)
            if estimate < cost:
                best, cost = cut, estimate
        return best, cost, forward, reverse


@dataclass(frozen=True)
class _Recording:
    """One interpretation of f with a tape: the tape, each node's value, f's output node and shape."""

    tape: Tape
    values: dict[int, Tensor]
    top: int  # f's output node; -1 if f's output does not depend on x
    out_shape: torch.Size


def _record(f: Callable[[Tensor], Tensor], x: Tensor) -> _Recording:
    interpreter = Interpreter(None, curvature_on_tape=True)
    values: dict[int, Tensor] = {}

    def watch(_: Interpreter, value: Tensor, jet: Jet) -> None:
        if jet.node >= 0:
            values[jet.node] = value

    interpreter.watch = watch
    y, jet = run(f, x, interpreter, None)
    assert interpreter.tape is not None
    return _Recording(interpreter.tape, values, jet.node if jet is not None else -1, y.shape)


def _layout(f: Callable[[Tensor], Tensor], x: Tensor, recorded: _Recording,
            flipped: Callable[[Tensor], Tensor]) -> Layout:
    """Where the batch is in each value recorded on x: `flipped` (f with its per-sample arguments in
    reverse order) is interpreted on x's samples in reverse order, and each value's batch dimension
    is the one it is reversed along (compared with a tolerance: a kernel may round a row differently
    in another place)."""
    batch = x.shape[0]
    if batch < 2:
        return Layout()
    again = _record(flipped, x.flip(0))
    dims: dict[int, int | None] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    same_path = len(again.tape) == len(recorded.tape)
    for node, value in recorded.values.items():
        other = again.values.get(node)
        d = None
        if same_path and other is not None and other.shape == value.shape:
            d = next((d for d, size in enumerate(value.shape) if size == batch and _reversed(other, value, d)), None)
        dims[node] = d
        if d is not None:
            shapes[node] = _without(value.shape, d)
    return Layout(dims, shapes)


def _reversed(other: Tensor, value: Tensor, d: int) -> bool:
    """Whether other is value reversed along d, up to rounding (infinities and NaN where value has them)."""
    flipped = value.detach().flip(d)
    rtol = max(1e-5, 100 * torch.finfo(value.dtype).eps)
    scale = float(flipped.nan_to_num(0.0, 0.0, 0.0).abs().max()) if value.numel() else 0.0
    return torch.allclose(other.detach(), flipped, rtol=rtol, atol=rtol * scale, equal_nan=True)


def analyse(f: Callable[[Tensor], Tensor], x: Tensor,
            flipped: Callable[[Tensor], Tensor] | None = None) -> Structure:
    """Record an interpretation of f on x (two distinct samples are enough) and find its cuts: traced
    values, strictly between the input and the output, that every path from x to f's output goes
    through and that hold the batch in a dimension of their own. `flipped`: f for x's samples in
    reverse order, where f has per-sample arguments bound (f itself if None). Raises Unsupported."""
    recorded = _record(f, x)
    layout = _layout(f, x, recorded, flipped or f)
    tape, top = recorded.tape, recorded.top
    out_numel = math.prod(recorded.out_shape[1:])
    if top < 0:
        return Structure((), tuple(0 for _ in tape), 0, out_numel, layout)
    live = {top}  # the values f's output depends on
    for node, links in reversed(tape[: top + 1]):
        if node in live:
            live.update(source for source, _ in links)
    work, total = [], 0
    lowest_source = [node for node in range(len(tape))]  # the earliest value feeding each value
    for node, links in tape:
        if node in live:
            total += sum(m.cost() for _, m in links)
            if links:
                lowest_source[node] = min(source for source, _ in links)
        work.append(total)
    cuts = []
    reach = math.inf  # the earliest source of any live value after the candidate
    for node in range(top - 1, 0, -1):
        if node + 1 <= top and node + 1 in live:
            reach = min(reach, lowest_source[node + 1])
        if node in live and reach >= node:
            cut = _cut(node, recorded.values[node].shape, layout, x.shape[0])
            if cut is not None:
                cuts.append(cut)
    return Structure(tuple(reversed(cuts)), tuple(work), total, out_numel, layout)


def _cut(node: int, shape: torch.Size, layout: Layout, batch: int) -> Cut | None:
    """The cut at `node` (its value of `shape` recorded on `batch` samples), None where its batch is not known."""
    if layout.dims is None:
        return Cut(node, tuple(shape[1:])) if shape and shape[0] == batch else None
    d = layout.dims.get(node)
    return None if d is None else Cut(node, layout.shapes[node], d)


def _rows(stack: Tensor, shape: torch.Size, batch_dim: int | None) -> Tensor:
    """A stack (L, *b) of a value of `shape` as (L, b, w): its batch dimension first (b is the batch,
    or 1 where the stack is the same for every sample), the others flattened; batch_dim None: the
    whole value is one sample's, (L, 1, numel)."""
    stack = lift(stack, len(shape))
    if batch_dim is None:
        return expanded(stack, shape).reshape(stack.shape[0], 1, -1)
    if batch_dim:
        stack = stack.movedim(batch_dim + 1, 1)
    rest = _without(shape, batch_dim)
    stack = stack.expand(stack.shape[0], stack.shape[1], *rest)
    return stack.reshape(stack.shape[0], stack.shape[1], math.prod(rest))


def _promoted(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """a and b in one dtype (an adjoint from a double part of f meeting a float32 stack)."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def meet_jacobian(f: Callable[[Tensor], Tensor], x: Tensor, cut: Cut, chunk: int | None = None) -> Tensor:
    """(B, *out, *in): forward mode from x up to `cut`, reverse mode from the output down to it,
    then one batched product per sample. Raises Unsupported if, on this call, the value at the cut
    is not one (f took another path): the caller computes the Jacobian another way."""
    n = math.prod(x.shape[1:])
    batch = x.shape[0]
    interpreter = Interpreter(Order("first", n), record=False)
    seen = [0]
    held: dict[str, Tensor] = {}
    at: list[torch.Size] = []  # the shape of the value at the cut

    def watch(interp: Interpreter, value: Tensor, jet: Jet) -> None:
        if jet.stale:
            return
        seen[0] += 1
        if seen[0] - 1 != cut.index:
            return
        shape = value.shape
        d = cut.batch_dim
        if len(shape) <= d or shape[d] != batch or _without(shape, d) != cut.shape:
            interp.fail(f"the meeting point of forward and reverse mode moved (a value of shape {tuple(shape)}, not "
                        f"{cut.shape} with the batch in dimension {d})")
        held["t"] = jet.tangents()  # (n, *b): the forward half
        at.append(shape)
        for ref, other in list(interp.table.values()):
            if ref() is not value:
                other.node = BYPASS
        interp.forward, interp.second, interp.tape = False, False, []
        jet.node = len(interp.tape)
        interp.tape.append((jet.node, []))
        jet._t, jet.pending, jet.s = None, None, None

    interpreter.watch = watch
    from .api import basis  # the input's directions

    y, jet = run(f, x, interpreter, basis(0, n, x))
    if "t" not in held:
        raise Unsupported("f did not reach the meeting point of forward and reverse mode")
    if jet is not None and jet.node == BYPASS:
        raise Unsupported("f's output depends on x other than through the meeting point of forward and reverse mode")
    m = math.prod(y.shape[1:])
    t = _rows(held["t"], at[0], cut.batch_dim).permute(1, 2, 0)  # (b, w, n)
    tape = interpreter.tape
    assert tape is not None
    rows = []
    for start, stop in _spans(m, chunk):
        k = stop - start
        adjoint = sweep(tape, jet.node, _one_hot(start, stop, y), 0) if jet is not None and jet.node >= 0 else None
        if adjoint is None:
            rows.append(x.new_zeros(batch, k, n))
            continue
        a, t = _promoted(_rows(adjoint, at[0], cut.batch_dim).transpose(0, 1), t)  # (b, k, w)
        if k == m and not torch.is_grad_enabled() and a.shape[0] == t.shape[0] == batch and a.dtype == x.dtype:
            rows.append(torch.matmul(a, t, out=memory.empty((batch, k, n), x)))  # one batched product over the samples
        else:
            rows.append(torch.matmul(a, t).expand(batch, k, n))
    jac = rows[0] if len(rows) == 1 else torch.cat(rows, 1)  # (B, m, n)
    if 0 in jac.stride():
        jac = jac.contiguous()
    return jac.reshape(*y.shape, *x.shape[1:])


def second_order_by_adjoints(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None = None,
                             chunk: int | None = None, layout: Layout | None = None) -> Tensor:
    """laplacian, hessian_diag, hvp or hessian (shapes in api) without second-order stacks: the
    input's tangents are carried forward, each operation's own second-order term (y'' T_a T_b for
    an elementwise y, the cross term of a product...) is kept on the tape, and one reverse sweep per
    output element weights them by the output's adjoint: d2 f_m / de_a de_b is the sum over the
    operations of <adjoint of f_m at the op, its term>. Cheaper than carrying the second-order
    stacks through every later layer when there are fewer outputs than pairs of directions (a
    scalar's Hessian diagonal or Hessian). `chunk` input directions per interpretation; `layout`
    where each value holds the batch (`analyse`; None: first, where a value's first dimension has
    the batch's size)."""
    from .api import spans, spans_of_work

    n = math.prod(x.shape[1:])
    stacks = (n + 3) / 2 if op == "hessian" else 3.0  # every nonlinear operation's input tangents live until the sweep
    block, chunk = spans_of_work(f, x, op, chunk, stacks)
    layout = layout or Layout()
    if block >= x.shape[0]:
        return _by_adjoints(op, f, x, v, chunk, layout)
    return torch.cat([_by_adjoints(op, f, x[start:stop], v[start:stop] if v is not None else None, chunk, layout)
                      for start, stop in spans(x.shape[0], block)])


def _by_adjoints(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None, chunk: int | None,
                 layout: Layout) -> Tensor:
    """second_order_by_adjoints on one block of samples."""
    from .api import forward, order_for, spans

    n = math.prod(x.shape[1:])
    in_shape = tuple(x.shape[1:])
    pieces: list[Tensor] = []
    y = None
    every = spans(n, chunk)
    memo = Memo() if len(every) > 1 else None
    for start, stop in every:
        order, first = order_for(op, n, start, stop, x.device)
        hi = n if op == "hessian" else stop
        interpreter = Interpreter(order, curvature_on_tape=True)
        y, jet = forward(f, x, order, first, hi, v, interpreter=interpreter, memo=memo)
        pairs = _pair_count(order)
        m = math.prod(y.shape[1:])
        if jet is None or jet.node < 0 or m == 0:
            pieces.append(y.new_zeros(y.shape[0], m, pairs))
            continue
        seed = _one_hot(0, m, y)
        total = _weighted_curvatures(interpreter, jet.node, seed, order, layout, x.shape[0])
        pieces.append(y.new_zeros(y.shape[0], m, pairs) if total is None else total.expand(y.shape[0], m, pairs))
    assert y is not None
    out = y.shape[1:]
    if op == "laplacian":
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        return total.reshape(*y.shape)
    whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
    if op == "hessian":
        if len(pieces) == 1:  # pairs i <= j, mirrored
            from .order import pair_table
            whole = whole.index_select(-1, pair_table(n, x.device))
        return whole.reshape(y.shape[0], *out, *in_shape, *in_shape)
    return whole.reshape(y.shape[0], *out, *in_shape)


def _pair_count(order: Order) -> int:
    if order.kind == "sum":
        return 1
    if order.kind == "pairs":
        assert order.pairs is not None
        return order.pairs[0].numel()
    return order.directions


def _weighted_curvatures(interpreter: Interpreter, top: int, seed: Tensor, order: Order, layout: Layout,
                         batch: int) -> Tensor | None:
    """Sum over the tape's operations of <adjoint at the op, its curvature>, per sample: (b, M, P) for
    the M output directions of `seed` and the order's P pairs."""
    tape, curvatures, shapes = interpreter.tape, interpreter.curvatures, interpreter.shapes
    assert tape is not None and curvatures is not None
    adjoints: dict[int, Tensor] = {top: seed}
    total: Tensor | None = None
    for node, links in reversed(tape[: top + 1]):
        adjoint = adjoints.pop(node, None)
        if adjoint is None:
            continue
        curvature = curvatures.get(node)
        if curvature is not None:
            term = curvature(order)
            if term is not None:
                shape = shapes[node]
                d = layout.batch_dim(node, shape, batch)
                a = _rows(adjoint, shape, d).transpose(0, 1)  # (b, M, w)
                c = _rows(term, shape, d).permute(1, 2, 0)  # (b, w, P)
                total = add(total, torch.matmul(*_promoted(a, c)))
        for source, m in links:
            adjoints[source] = add(adjoints.get(source), m.transpose(adjoint))  # type: ignore[assignment]
    return total
