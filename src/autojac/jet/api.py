"""What the engine computes, as plain functions of (f, x): Jacobians, second-order quantities,
several of them in one pass, divergences, and whether the engine can follow f at all.

Shapes: x is (B, *in) with n = prod(in) elements per sample; f(x) is (B, *out).

    jacobian      (B, *out, *in)
    laplacian     (B, *out)              sum_i d2 f / dx_i2
    hessian_diag  (B, *out, *in)         d2 f / dx_i2
    hvp           (B, *out, *in)         H v, v of x's shape
    hessian       (B, *out, *in, *in)

Results are plain torch operations of x and f's parameters: with gradients enabled they are
differentiable (create_graph), exactly as f's own output would be.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..buffers import preserved_buffers
from ..calls import checking
from ..signature import WeakTable, describe, weak_slot
from .interpreter import Interpreter, Jet, Memo, run
from . import memory
from .order import Order, pair_table
from .reverse import Structure, analyse
from .stacks import Unsupported, expanded, lift

SECOND_ORDER = ("laplacian", "hessian_diag", "hessian", "hvp")
KNOWN = ("value", "jacobian", *SECOND_ORDER)


def basis(start: int, stop: int, x: Tensor) -> Tensor:
    """The input basis vectors e_start .. e_{stop-1}, the same for every sample: (k, 1, *in).
    Made once per span, shape, dtype and device (the engine never writes into a stack)."""
    return _basis(start, stop, tuple(x.shape[1:]), x.dtype, x.device)


@functools.lru_cache(maxsize=64)
def _basis(start: int, stop: int, in_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    k = stop - start
    rows = torch.zeros(k, math.prod(in_shape), dtype=dtype, device=device)
    rows[torch.arange(k, device=device), torch.arange(start, stop, device=device)] = 1
    return rows.view(k, 1, *in_shape)


def spans(total: int, chunk: int | None) -> list[tuple[int, int]]:
    step = total if chunk is None else max(chunk, 1)
    return [(start, min(start + step, total)) for start in range(0, total, step)] or [(0, 0)]


def _per_sample(stack: Tensor | None, y: Tensor, count: int) -> Tensor:
    """A stack (L, *b) as (B, *out, L) for y of shape (B, *out); zeros for None."""
    if stack is None:
        return y.new_zeros(*y.shape, count)
    full = expanded(stack, y.shape)
    if 0 in full.stride()[1:] and full.numel() > 1:
        full = full.contiguous()
    return full.movedim(0, -1)


def _kind(op: str) -> str:
    return {"laplacian": "sum", "hessian_diag": "diag", "hvp": "along", "hessian": "pairs", "jacobian": "first",
            "value": "first"}[op]


def order_for(op: str, n: int, start: int, stop: int, device: torch.device) -> tuple[Order, int]:
    """The order for `op` on the chunk [start, stop) of directions, and where its directions start
    (the Hessian's chunk of rows pairs with every column, so it carries all n directions)."""
    if op != "hessian":
        return Order(_kind(op), stop - start), start
    return Order("pairs", n, _pairs(n, start, stop, device)), 0


@functools.lru_cache(maxsize=64)
def _pairs(n: int, start: int, stop: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The pairs (a, b) of directions whose second derivatives a Hessian's span of rows needs: i <= j
    for the whole Hessian (mirrored at the end), every (row, column) for a span of rows."""
    if (start, stop) == (0, n):
        a, b = torch.triu_indices(n, n, device=device)
        return a, b
    rows = torch.arange(start, stop, device=device).repeat_interleave(n)
    return rows, torch.arange(n, device=device).repeat(stop - start)


def forward(f: Callable[[Tensor], Tensor], x: Tensor, order: Order, start: int, stop: int,
            v: Tensor | None = None, interpreter: Interpreter | None = None,
            memo: Memo | None = None) -> tuple[Tensor, Jet | None]:
    """Interpret f on x carrying the directions e_start .. e_{stop-1} (and v last, for "along");
    `memo` shares values with the other spans of the same call."""
    seeds = basis(start, stop, x)
    if order.kind == "along":
        assert v is not None
        seeds = torch.cat([seeds.expand(stop - start, *x.shape), v[None]])
    interpreter = interpreter or Interpreter(order)
    interpreter.memo = memo
    out = run(f, x, interpreter, seeds)
    if x.shape[0]:
        try:
            _WIDEST.setdefault(f, {})[(tuple(x.shape[1:]), x.dtype)] = interpreter.widest // x.shape[0]
        except TypeError:  # f cannot be held weakly
            pass
    return out


def derivatives(f: Callable[[Tensor], Tensor], x: Tensor, ops: Iterable[str] = ("value", "jacobian", "laplacian"),
                *, v: Tensor | None = None, chunk: int | None = None) -> dict[str, Tensor]:
    """Several quantities of f at x from one forward pass (per chunk of input directions): the value,
    the Jacobian, and at most one second-order quantity. Returns {op: tensor}, shapes in the module
    docstring. Raises Unsupported if f does something the engine has no rule for."""
    ops = tuple(ops)
    unknown = [op for op in ops if op not in KNOWN]
    if unknown:
        raise ValueError(f"unknown operation {unknown[0]!r}; known: {', '.join(KNOWN)}")
    second = [op for op in ops if op in SECOND_ORDER]
    if len(second) > 1:
        raise ValueError(f"one second-order quantity per pass, got {second}; call derivatives once for each")
    if second and second[0] == "hvp" and v is None:
        raise ValueError("hvp needs v, a direction per sample of x's shape")
    if second and second[0] == "hessian" and "jacobian" in ops and chunk is not None:
        raise ValueError("the Hessian's chunks carry every direction: ask for the Jacobian without chunk")
    kind = second[0] if second else "jacobian"
    block, chunk = spans_of_work(f, x, kind, chunk)
    if block >= x.shape[0]:
        return _derivatives(f, x, ops, kind, v, chunk)
    parts = [_derivatives(f, x[start:stop], ops, kind, v[start:stop] if v is not None else None, chunk)
             for start, stop in spans(x.shape[0], block)]
    return {op: torch.cat([part[op] for part in parts]) for op in parts[0]}


def _derivatives(f: Callable[[Tensor], Tensor], x: Tensor, ops: tuple[str, ...], kind: str, v: Tensor | None,
                 chunk: int | None) -> dict[str, Tensor]:
    """derivatives() on one block of samples, `chunk` input directions per interpretation."""
    n = math.prod(x.shape[1:])
    second = kind in SECOND_ORDER
    want_jacobian = "jacobian" in ops
    y = None
    directions: Tensor | None = None  # the Jacobian, directions first: (n, B, *out)
    pieces: list[Tensor] = []
    seconds: list[Tensor] = []
    every = spans(n, chunk)
    memo = Memo() if len(every) > 1 else None
    for start, stop in every:
        order, first = (order_for(kind, n, start, stop, x.device) if second else (Order("first", stop - start), start))
        hi = n if kind == "hessian" else stop
        y, jet = forward(f, x, order, first, hi, v, memo=memo)
        if want_jacobian and (kind != "hessian" or start == 0):
            if kind == "hessian" or torch.is_grad_enabled():  # (the Hessian's spans carry every direction)
                pieces.append(_directions(jet, y, hi - first))
            else:  # each span written into the result: one large allocation, no copy of the pieces
                if directions is None:
                    directions = memory.empty((n, *y.shape), y)
                _write(directions[start:stop], jet, y)
        if second:
            seconds.append(_finish_second(kind, jet, y, order, n, start, stop))
        if not second and not want_jacobian:
            break
    assert y is not None
    in_shape = tuple(x.shape[1:])
    out: dict[str, Tensor] = {}
    if "value" in ops:
        out["value"] = y
    if want_jacobian:
        if directions is None:
            directions = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        out["jacobian"] = directions.movedim(0, -1).reshape(*y.shape, *in_shape)
    if second:
        out[kind] = _join_second(kind, seconds, y, in_shape)
    return out


def _directions(jet: Jet | None, y: Tensor, count: int) -> Tensor:
    """The first-order stack of f's output as (count, B, *out), materialized where it was compact."""
    t = jet.t if jet is not None else None
    if t is None:
        return y.new_zeros(count, *y.shape)
    full = expanded(t[:count], y.shape)
    return full.contiguous() if 0 in full.stride()[1:] and full.numel() > 1 else full


def _write(into: Tensor, jet: Jet | None, y: Tensor) -> None:
    """Write f's output's first-order stack into `into` (k, B, *out); a pending linear layer writes its
    product there directly."""
    if jet is None:
        into.zero_()
        return
    pending = jet.pending
    if pending is not None and into.dim() == 3:
        stack, weight = pending
        torch.matmul(expanded(stack, (y.shape[0], stack.shape[-1])), weight.t(), out=into)
        return
    into.copy_(expanded(jet.tangents(), y.shape))


# How much work one interpretation takes on, on CPU. A Jacobian's directions are taken in spans whose
# stacks stay near SPAN_BYTES per traced value: a fresh allocation of 32 MB or more is mapped anew
# from the system at every call (page faults: 3x slower per byte on the development machine). Second
# order takes the batch in blocks whose stacks stay near BLOCK_BYTES per traced value, about what the
# caches hold: its elementwise rules read and write every stack several times, and the same work on
# blocks of 256 to 1024 samples ran 1.5-3x faster than on 4096 at once (hand-written nested autograd,
# one direction at a time, stays in cache too). Within one call, spans share the values that do not
# depend on the directions.
SPAN_BYTES = 16 << 20
BLOCK_BYTES = 4 << 20
SMALLEST_BLOCK = 256
# f -> {(per-sample shape of x, dtype): elements per sample of f's widest traced value}
_WIDEST: weakref.WeakKeyDictionary[Callable[[Tensor], Tensor], dict[tuple[tuple[int, ...], torch.dtype], int]]
_WIDEST = weakref.WeakKeyDictionary()


def _widest(f: Callable[[Tensor], Tensor], x: Tensor) -> int | None:
    """Elements per sample of f's widest traced value, seen in an earlier call on inputs like x."""
    try:
        return _WIDEST.get(f, {}).get((tuple(x.shape[1:]), x.dtype))
    except TypeError:  # f cannot be held weakly
        return None


def stacks_per_direction(kind: str, n: int) -> float:
    """Stacks each traced value carries per input direction (first and second order)."""
    return {"laplacian": 1.0, "hessian_diag": 2.0, "hvp": 2.0, "hessian": (n + 3) / 2}.get(kind, 1.0)


def spans_of_work(f: Callable[[Tensor], Tensor], x: Tensor, kind: str, chunk: int | None,
                  stacks: float | None = None) -> tuple[int, int | None]:
    """(samples per block, directions per span) for this call: the whole batch and the caller's chunk
    where nothing is known yet (the first call) or off CPU; see SPAN_BYTES and BLOCK_BYTES. It changes
    only the cost, never the result."""
    batch, n = x.shape[0], math.prod(x.shape[1:])
    widest = _widest(f, x) if x.device.type == "cpu" else None
    if not widest:
        return batch, chunk
    per_direction = widest * x.element_size() * (stacks or stacks_per_direction(kind, n))
    if kind == "jacobian":  # its result is large: spans of directions only, written in place
        if chunk is None:
            chunk = max(1, int(SPAN_BYTES // max(batch * per_direction, 1)))
        return batch, chunk
    directions = n if chunk is None or kind == "hessian" else min(chunk, n)
    block = max(SMALLEST_BLOCK, int(BLOCK_BYTES // max(directions * per_direction, 1)))
    if block >= batch:
        block = batch
    if chunk is None and kind != "hessian":
        chunk = max(1, int(BLOCK_BYTES // max(min(block, batch) * per_direction, 1)))
    return block, chunk


def _finish_second(kind: str, jet: Jet | None, y: Tensor, order: Order, n: int, start: int, stop: int) -> Tensor:
    s = jet.s if jet is not None else None
    if kind == "laplacian":
        return expanded(s, y.shape)[0] if s is not None else y.new_zeros(y.shape)
    if kind == "hessian":
        if s is not None and (start, stop) == (0, n):
            s = s.index_select(0, pair_table(n, y.device))
        return _per_sample(s, y, (stop - start) * n)
    return _per_sample(s, y, stop - start)


def _join_second(kind: str, pieces: list[Tensor], y: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    if kind == "laplacian":
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        return total if total.shape == y.shape else total.expand(y.shape)
    whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
    tail = in_shape + in_shape if kind == "hessian" else in_shape
    return whole.reshape(*y.shape, *tail)


def jacobian(f: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None = None) -> Tensor:
    """(B, *out, *in) by forward mode: the directions carried from the input."""
    return derivatives(f, x, ("jacobian",), chunk=chunk)["jacobian"]


def second_order(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None = None,
                 chunk: int | None = None) -> Tensor:
    """One of laplacian, hessian_diag, hvp, hessian; shapes in the module docstring."""
    return derivatives(f, x, (op,), v=v, chunk=chunk)[op]


def divergence(f: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None = None) -> Tensor:
    """(B,): the trace of each sample's square Jacobian, sum_i d f_i / d x_i, for f whose per-sample
    output has as many elements as its input. When f's last operation is a linear layer, only the
    diagonal of its product is formed (n dot products per sample instead of an n x n product)."""
    n = math.prod(x.shape[1:])
    total: Tensor | None = None
    for start, stop in spans(n, chunk):
        y, jet = forward(f, x, Order("first", stop - start), start, stop)
        if math.prod(y.shape[1:]) != n:
            raise ValueError(f"divergence needs f's output to have as many elements per sample as its input ({n}); "
                             f"f returned per-sample shape {tuple(y.shape[1:])}")
        part = y.new_zeros(y.shape[0]) if jet is None else _trace(jet, y, start, stop)
        total = part if total is None else total + part
    assert total is not None
    return total


def _trace(jet: Jet, y: Tensor, start: int, stop: int) -> Tensor:
    """sum over the chunk's directions k of d y[start + k] / d e_k: (B,)."""
    k = stop - start
    pending = jet.pending  # f's last operation was a linear layer whose tangents nothing read
    if pending is not None and y.dim() == 2:  # y = h W^T + b: only entries (k, start + k) are needed
        stack, weight = pending
        return (lift(stack, 2) * weight[start:stop, None, :]).sum((0, 2)).expand(y.shape[0])
    t = _per_sample(jet.t, y, k).reshape(y.shape[0], -1, k)  # (B, n, k)
    return t[:, start:stop, :].diagonal(dim1=1, dim2=2).sum(-1)


class Profile:
    """What the engine learnt about f for inputs of one shape: whether it can follow f (`reason`,
    "" if so) and, when asked, the cuts of f's computation (for meeting in the middle)."""

    def __init__(self, reason: str):
        self.reason = reason
        self._structure: Structure | str | None = None

    def structure(self, f: Callable[[Tensor], Tensor], x: Tensor,
                  flipped: Callable[[Tensor], Tensor] | None = None) -> Structure | str:
        """f's cuts and where its values hold the batch, from recorded interpretations on two samples
        (reverse.analyse); or why there are none. These passes of f are autojac's own (no aux). Where
        f has per-sample arguments bound, x has two samples and `flipped` is f for them reversed."""
        if self._structure is None:
            try:
                with torch.no_grad(), preserved_buffers(describe(f).modules()), checking():
                    sample = x.detach() if flipped is not None else _two_samples(x.detach())
                    self._structure = analyse(f, sample, flipped)
            except Exception as error:  # never raised to the user: the strategy does not apply
                self._structure = f"{type(error).__name__}: {error}" if not isinstance(error, Unsupported) else str(error)
        return self._structure


def _two_samples(x: Tensor) -> Tensor:
    """The first sample of x and the first that differs from it (where the batch is in a value is
    told by exchanging two samples: equal ones would tell nothing)."""
    if x.shape[0] <= 2:
        return x
    flat = x.flatten(1)
    other = (flat != flat[:1]).any(1).nonzero()
    return x[[0, int(other[0])]] if other.numel() else x[:2]


_PROFILES = WeakTable()


def profile(f: Callable[[Tensor], Tensor], x: Tensor) -> Profile:
    """The engine's profile of f for inputs like x, kept per f and per shape while f's description holds
    (signature.describe: nothing it reads was rebound). It decides only whether the engine is tried and where forward
    and reverse mode meet; every call interprets f afresh, and a call that leaves the profiled path is
    computed by a generic strategy, so a stale profile can cost time but never a wrong result."""
    info = describe(f)
    slot, name = weak_slot(f, _PROFILES, make=True)
    key = (name, tuple(x.shape[1:]), x.dtype, x.device)
    if slot is not None:
        found = slot.get(key)
        if found is not None and found[0] is info:
            return found[1]
    made = Profile(_check(f, x))
    if slot is not None:
        slot[key] = (info, made)
    return made


def check(f: Callable[[Tensor], Tensor], x: Tensor) -> str:
    """"" if the engine can follow f on inputs like x (every operation f calls on a traced tensor has
    a rule), else the reason, naming the operation. Runs f once on two samples with two directions
    (a few milliseconds for a small network) the first time for f and this shape; never raises."""
    return profile(f, x).reason


def _unseen(f: Callable[[Tensor], Tensor], x: Tensor, directions: Tensor) -> str:
    """"" if the engine's first directions (k, B, *out) of f at x agree with one reverse pass of autograd,
    else why not: operations that run outside Python (a torch.jit.script module, a compiled graph) are
    invisible to the engine, which would take their outputs for constants. Batch sums are compared, so
    the check holds for f that mixes samples too."""
    k = directions.shape[0]
    try:
        with torch.enable_grad(), preserved_buffers(describe(f).modules()), checking():
            leaf = x.detach().requires_grad_()
            y = f(leaf)
            if not isinstance(y, Tensor) or y.shape != directions.shape[1:] or not y.is_floating_point():
                return ""
            if not y.requires_grad:
                seen = torch.zeros(k, dtype=directions.dtype, device=directions.device)
            else:
                u = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype).to(y.device)
                (grad,) = torch.autograd.grad(y, leaf, u, allow_unused=True)
                seen = (grad.flatten(1)[:, :k].sum(0) if grad is not None
                        else torch.zeros(k, dtype=y.dtype, device=y.device))
        made = (directions * u).flatten(1).sum(1) if y.requires_grad else directions.flatten(1).abs().sum(1)
    except Exception:  # autograd cannot follow f either: nothing to compare with
        return ""
    seen, made = seen.detach(), made.detach()
    scale = float(seen.abs().max()) + float(made.abs().max()) + 1e-6
    tolerance = 1e-3 if directions.dtype in (torch.float32, torch.float64) else 5e-2
    if float((made - seen).abs().max()) > tolerance * scale:
        return ("the engine's derivatives of f disagree with autograd's on a check: f runs operations the "
                "engine does not see (a torch.jit.script module, a compiled graph, a C++ extension?)")
    return ""


def _check(f: Callable[[Tensor], Tensor], x: Tensor) -> str:
    n = math.prod(x.shape[1:])
    if n == 0 or x.shape[0] == 0:
        return "x has no elements"
    k = min(n, 2)
    attempts = [x[:2], x] if x.shape[0] > 2 else [x]
    why = ""
    for sample in attempts:
        try:
            with torch.no_grad(), preserved_buffers(describe(f).modules()), checking():
                y, jet = forward(f, sample.detach(), Order("first", k), 0, k)
            if y.shape[0] != sample.shape[0]:
                return f"f returned {y.shape[0]} rows for a batch of {sample.shape[0]}"
            return _unseen(f, sample, _directions(jet, y, k))
        except Unsupported as error:
            why = str(error)
            if why.startswith("no rule for"):  # the same on any batch
                return why
        except Exception as error:  # f itself failed on this slice; try the whole batch
            why = f"f raised {type(error).__name__} under the engine: {error}"
        # otherwise f may need its whole batch (it holds per-sample tensors, or has per-sample arguments)
    return why


