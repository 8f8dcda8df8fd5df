"""Strategies of the structure-aware engine (autojac.jet): f interpreted operation by operation,
Taylor coefficients carried beside each value by one rule per primitive.

They apply to any batch-independent f whose operations all have rules (modules, wrapped modules,
functions, lambdas; normalizations, attention, residual blocks...); the plan names the first
operation without one. The verdict is taken once per f and input shape on two samples; if a later
call of f takes a path with an operation the engine cannot follow (a Python branch), that call is
computed by a generic strategy instead, so a result is never wrong for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from ..jet import api, reverse
from ..jet.stacks import Unsupported
from ..problem import Problem, Sizes
from .curvature import OPS_DIAGONAL, diagonal_of
from .registry import BATCH_INDEPENDENT, Strategy, get, register

log = logging.getLogger("autojac")

# What a call computes instead when f takes a path the engine cannot follow (plain autograd, no vmap).
FALLBACK = {"jacobian": "sum_grad", "hessian": "sum_grad_grad", "hvp": "hvp_rev_rev",
            "hessian_diag": "grad_grad_diag", "laplacian": "grad_grad_diag", "divergence": "div_rows",
            "derivatives": "nested_derivatives"}


def _applies(p: Problem) -> str:
    return api.check(p.f, p.x)


def _guarded(compute: Callable[[Problem, int | None], Tensor]) -> Callable[[Problem, int | None], Tensor]:
    def run(p: Problem, chunk: int | None) -> Tensor:
        try:
            return compute(p, chunk)
        except Unsupported as error:
            log.debug("the engine cannot follow this call of f (%s); %s computes it", error, FALLBACK[p.op])
            with torch.enable_grad():  # plain autograd, whatever mode the engine ran in
                result = get(FALLBACK[p.op]).run(p, None)
            assert isinstance(result, Tensor)  # the fallbacks compute one result
            return result
    return run


def _second_order(p: Problem, chunk: int | None) -> Tensor:
    return api.second_order(p.op, p.f, p.x, p.v, chunk)


def _structure(p: Problem) -> reverse.Structure | str:
    """f's cuts and where its values hold the batch (api.Profile.structure), found on two distinct
    samples: where f has per-sample arguments bound (args, dims), it takes only the whole batch, so
    they are taken at those samples too, and reversed with them."""
    if not p.args or p.base is None or p.batch < 2:
        return api.profile(p.f, p.x).structure(p.f, p.x)
    base, flat = p.base, p.x.flatten(1)
    differ = (flat != flat[:1]).any(1).nonzero()  # equal samples would not tell where the batch is
    index = torch.tensor([0, int(differ[0]) if differ.numel() else 1], device=p.x.device)

    def args(order: Tensor) -> tuple[object, ...]:
        return tuple(a if d is None else a.index_select(d, order.to(a.device)) for a, d in zip(p.args, p.arg_dims))

    ahead, flipped = args(index), args(index.flip(0))
    return api.profile(p.f, p.x).structure(lambda x: base(x, *ahead), p.x[index],
                                           lambda x: base(x, *flipped))


def _by_adjoints(p: Problem, chunk: int | None) -> Tensor:
    structure = _structure(p)  # where f's values hold the batch
    layout = structure.layout if isinstance(structure, reverse.Structure) else None
    return reverse.second_order_by_adjoints(p.op, p.f, p.x, p.v, chunk, layout)


def _jacobian(p: Problem, chunk: int | None) -> Tensor:
    return api.jacobian(p.f, p.x, chunk)


def _reverse_jacobian(p: Problem, chunk: int | None) -> Tensor:
    return reverse.reverse_jacobian(p.f, p.x, chunk)


def _meet_applies(p: Problem) -> str:
    why = _applies(p)
    if why:
        return why
    structure = _structure(p)
    if isinstance(structure, str):
        return structure
    if not structure.cuts:
        return ("f has no layer that every path from x to its output goes through (as a chain's layers are) and "
                "holds the batch in a dimension of its own")
    return ""


def _meet_jacobian(p: Problem, chunk: int | None) -> Tensor:
    structure = _structure(p)
    if isinstance(structure, str) or not structure.cuts:
        raise Unsupported("f has no cut")
    out_numel = structure.out_numel
    cut, _, _, _ = structure.best(p.n, out_numel)
    assert cut is not None
    return reverse.meet_jacobian(p.f, p.x, cut, chunk)


def _memory(carried: Callable[[int], int], result: Callable[[Sizes], int]) -> Callable[[Sizes, int | None], int]:
    """Every traced value carries `carried(c)` stacks of its size for c directions beside itself; the
    result is kept twice (pieces and whole)."""
    def estimate(s: Sizes, chunk: int | None) -> int:
        c = min(chunk or s.n, s.n)
        return s.activations * (2 + carried(c)) + 2 * result(s)
    return estimate


def _in_basis(s: Sizes) -> int:
    return s.n


def _out_basis(s: Sizes) -> int:
    return s.m


register(Strategy(
    name="jet_laplacian", ops=OPS_DIAGONAL, run=_guarded(_second_order),
    memory=_memory(lambda c: 2 * c, lambda s: s.tensor(s.batch, s.m, s.n)), basis=_in_basis,
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine: value, tangents of the input directions and their second derivatives (summed for the "
            "Laplacian) carried through f's operations in one forward pass",
))
register(Strategy(
    name="jet_hessian", ops=frozenset({"hessian"}), run=_guarded(_second_order),
    memory=_memory(lambda c: c + c * c, lambda s: s.tensor(s.batch, s.m, s.n, s.n)), basis=_in_basis,
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine: value, tangents and second derivatives of every pair of input directions (i <= j) "
            "carried through f's operations in one forward pass",
))
register(Strategy(
    name="jet_hvp", ops=frozenset({"hvp"}), run=_guarded(_second_order),
    memory=_memory(lambda c: 2 * c + 1, lambda s: s.tensor(s.batch, s.m, s.n)), basis=_in_basis,
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine: value, tangents of the input directions and of v, and the second derivatives along "
            "(e_i, v), carried through f's operations in one forward pass",
))
register(Strategy(
    name="jet_fwd_rev", ops=OPS_DIAGONAL | {"hessian", "hvp"}, run=_guarded(_by_adjoints),
    memory=_memory(lambda c: 3 * c, lambda s: s.tensor(s.batch, s.m, s.n, s.n)), basis=_in_basis,
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine: tangents of the input directions carried forward, each operation's own second-order "
            "term kept, then one reverse sweep per output element weighting them by its adjoint (no "
            "second-order stacks: cheaper for few outputs)",
))
register(Strategy(
    name="jet_jacobian_fwd", ops=frozenset({"jacobian"}), run=_guarded(_jacobian),
    memory=_memory(lambda c: c, lambda s: s.tensor(s.batch, s.m, s.n)), basis=_in_basis,
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine in forward mode: the input directions carried through f's operations, every linear "
            "layer one matrix product over samples x directions",
))
register(Strategy(
    name="jet_jacobian_rev", ops=frozenset({"jacobian"}), run=_guarded(_reverse_jacobian),
    memory=_memory(lambda c: 1, lambda s: s.tensor(s.batch, s.m, s.n) * 2), basis=_out_basis,
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine in reverse mode: f interpreted once, then the output directions carried back through "
            "each operation's transposed derivative (the last layer's adjoint is its weight)",
))
register(Strategy(
    name="jet_jacobian_meet", ops=frozenset({"jacobian"}), run=_guarded(_meet_jacobian),
    memory=_memory(lambda c: c, lambda s: s.tensor(s.batch, s.m, s.n) * 2), basis=_out_basis,
    applies=_meet_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine meeting in the middle: input directions forward to the cut of f that costs least "
            "(a narrow layer of a chain), output directions back to it, one batched product per sample",
))


def _derivatives(p: Problem, chunk: int | None) -> tuple[Tensor, ...]:
    # One pass for the set: the value and the Jacobian come with the engine's carry anyway; the
    # second-order quantity carried is the largest asked (the Hessian gives its diagonal, the
    # diagonal its sum).
    asked = set(p.want)
    kind = next((q for q in ("hessian", "hessian_diag", "laplacian") if q in asked), None)
    ops: list[str] = [q for q in ("value", "jacobian") if q in asked] + ([kind] if kind else [])
    if p.second_dims is not None and kind in ("hessian_diag", "laplacian"):
        kind = "hessian_diag"  # the chosen directions' entries, summed below where the Laplacian is asked
        ops = [q for q in ops if q != "laplacian"] + (["hessian_diag"] if "hessian_diag" not in ops else [])
    found = api.derivatives(p.f, p.x, ops, chunk=None if kind == "hessian" else chunk)
    if p.second_dims is not None:
        index = list(p.second_dims)
        if "hessian" in found:
            hessian = found["hessian"]
            square = hessian.reshape(*hessian.shape[: hessian.dim() - 2 * len(p.in_shape)], p.n, p.n)
            found["hessian"] = square[..., index, :][..., index]
            found["hessian_diag"] = found["hessian"].diagonal(dim1=-2, dim2=-1)
        else:
            diag = found["hessian_diag"]
            found["hessian_diag"] = diag.reshape(*diag.shape[: diag.dim() - len(p.in_shape)], p.n)[..., index]
        found["laplacian"] = found["hessian_diag"].sum(-1)
        return tuple(found[q] for q in p.want)
    if kind == "hessian" and asked & {"hessian_diag", "laplacian"}:
        found["hessian_diag"] = diagonal_of(found["hessian"], p.in_shape)
    if "laplacian" in asked and "laplacian" not in found:
        diag = found["hessian_diag"]
        found["laplacian"] = diag.reshape(*diag.shape[: diag.dim() - len(p.in_shape)], -1).sum(-1)
    return tuple(found[q] for q in p.want)


def _divergence(p: Problem, chunk: int | None) -> Tensor:
    return api.divergence(p.f, p.x, chunk)


register(Strategy(
    name="jet_derivatives", ops=frozenset({"derivatives"}), run=_guarded(_derivatives),  # type: ignore[arg-type]
    memory=_memory(lambda c: 2 * c, lambda s: s.tensor(s.batch, s.m, s.n, s.n)), basis=_in_basis,
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine: the value, the Jacobian and the second-order quantity asked for, carried through f's "
            "operations in one forward pass",
))
register(Strategy(
    name="jet_divergence", ops=frozenset({"divergence"}), run=_guarded(_divergence),
    memory=_memory(lambda c: c, lambda s: s.tensor(s.batch)), basis=_in_basis,
    applies=_applies, needs=frozenset({BATCH_INDEPENDENT}),
    summary="the engine in forward mode, keeping each direction's own output entry (only the diagonal of a "
            "last linear layer's product is formed)",
))
