"""What people compute without autojac, per operation, written with torch.func and
torch.autograd.functional directly (they do not use autojac's strategies, except the
chunked full-Jacobian diagonal when the literal one would not fit).

Each operation has up to two baselines: the `tutorial` one (what the torch.func tutorials
recommend: vmap of jacrev, of hessian, of jvp-of-jacrev) and the `full` one (the whole-batch
derivative, then its diagonal: the usual forum answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor
from torch.func import hessian, jacrev, jvp, vmap

from autojac import demo
from autojac.memory import budget_bytes, format_bytes
from autojac.probes import Probes
from autojac.problem import Sizes
from autojac.strategies import registry
from autojac.strategies.basis import one_sample

Role = Literal["tutorial", "full"]
FULL_LIMIT = demo.FULL_JACOBIAN_LIMIT  # bytes: above this a whole-batch derivative is not attempted
CHUNKED_FULL = "full_diag[chunk=64]"  # what the demo's chunked full-Jacobian diagonal runs


@dataclass(frozen=True)
class Baseline:
    """A baseline contender; `run` None means it does not apply here, and `reason` says why."""

    name: str
    role: Role
    run: Callable[[], Tensor] | None
    reason: str = ""
    same_as: str | None = None  # the fixed strategy label that computes exactly this, if any


def for_op(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None, probes: Probes) -> list[Baseline]:
    """The baselines of `op` for f at x (v: the hvp direction)."""
    makers = {"jacobian": _jacobian, "hessian": _hessian, "hvp": _hvp,
              "hessian_diag": _hessian_diag, "laplacian": _laplacian}
    return makers[op](f, x, v, probes) if op in makers else []


def _per_sample_reason(probes: Probes) -> str:
    if not probes.batch_independent:
        return "f mixes samples: a per-sample vmap would be wrong"
    if not probes.vmap_ok:
        return f"f does not run under vmap: {probes.vmap_error}"
    return ""


def _jacobian(f, x, v, probes: Probes) -> list[Baseline]:
    # The demo's baselines: vmap(jacrev), and the whole-batch Jacobian's diagonal blocks
    # (torch.autograd.functional.jacobian when it fits, else autojac's chunked full_diag).
    found = demo.baselines(demo.Example("", f, x), math.prod(probes.out_shape))
    baselines = [Baseline(name, "tutorial" if name == "vmap(jacrev)" else "full", fn,
                          same_as=CHUNKED_FULL if name.endswith("(chunked)") else None)
                 for name, fn in found.items()]
    if "vmap(jacrev)" not in found:
        baselines.append(Baseline("vmap(jacrev)", "tutorial", None, _per_sample_reason(probes)))
    return baselines


def _hessian_per_sample(f, x, probes: Probes, name: str, finish: Callable[[Tensor], Tensor],
                        limit: int | None = FULL_LIMIT) -> Baseline:
    """vmap(hessian(f_one)) -> (B, *out, *in, *in), then `finish` (identity, diagonal or trace);
    not attempted if those Hessians would take over `limit` bytes."""
    reason = _per_sample_reason(probes)
    n, m = math.prod(x.shape[1:]), math.prod(probes.out_shape)
    size = 3 * x.shape[0] * m * n ** 2 * x.element_size()
    # It is vmap_fwd_rev run whole, and its working memory is that strategy's estimate: n m lanes
    # of f's activations (a decoder 8 -> 784 at B=512: 25 GB, which killed the benchmark).
    working = registry.get("vmap_fwd_rev", "hessian").memory(Sizes.of(x, probes.out_shape, probes.activations), None)
    budget = budget_bytes(x.device)
    if not reason and limit is not None and size > limit:
        reason = f"the per-sample Hessians need about {format_bytes(size)}, over {format_bytes(limit)}"
    elif not reason and budget is not None and working > budget:
        reason = (f"vmap(hessian) needs about {format_bytes(working)} (vmap_fwd_rev's estimate), over the "
                  f"memory budget of {format_bytes(budget)}")
    if reason:
        return Baseline(name, "tutorial", None, reason)
    per_sample = vmap(hessian(one_sample(f)))
    return Baseline(name, "tutorial", lambda: finish(per_sample(x)))


def _hessian_full(f, x, probes: Probes, name: str, finish: Callable[[Tensor], Tensor]) -> Baseline:
    """The Hessian of the batch-summed output, (*out, B, *in, B, *in): its diagonal is each
    sample's Hessian diagonal when f is batch-independent. `finish` gets it as (B, *out, *in)."""
    batch, n, m = x.shape[0], math.prod(x.shape[1:]), math.prod(probes.out_shape)
    size = 3 * m * (batch * n) ** 2 * x.element_size()
    if not probes.batch_independent:
        return Baseline(name, "full", None, "f mixes samples: the summed Hessian's diagonal is not per-sample")
    if size > FULL_LIMIT:
        return Baseline(name, "full", None, f"the whole-batch Hessian needs about {format_bytes(size)}, "
                                            f"over {format_bytes(FULL_LIMIT)}")
    out_shape = probes.out_shape
    full = hessian(lambda z: f(z).sum(0))

    def run() -> Tensor:
        h = full(x).reshape(m, batch * n, batch * n).diagonal(dim1=1, dim2=2)  # (m, B*n)
        return finish(h.reshape(*out_shape, *x.shape).movedim(len(out_shape), 0))

    return Baseline(name, "full", run)


def _diagonal(h: Tensor, x: Tensor) -> Tensor:
    """(B, *out, *in, *in) -> (B, *out, *in)."""
    in_shape, n = tuple(x.shape[1:]), math.prod(x.shape[1:])
    lead = h.shape[: h.dim() - 2 * len(in_shape)]
    return h.reshape(*lead, n, n).diagonal(dim1=-2, dim2=-1).reshape(*lead, *in_shape)


def _trace(d: Tensor, x: Tensor) -> Tensor:
    """(B, *out, *in) -> (B, *out)."""
    return d.flatten(d.dim() - (x.dim() - 1)).sum(-1)


def _hessian(f, x, v, probes: Probes) -> list[Baseline]:
    # The Hessians are the result itself here: no size limit beyond the case's own.
    return [_hessian_per_sample(f, x, probes, "vmap(hessian)", lambda h: h, limit=None)]


def _hvp(f, x, v, probes: Probes) -> list[Baseline]:
    name = "vmap(jvp(jacrev))"
    reason = _per_sample_reason(probes)
    if reason:
        return [Baseline(name, "tutorial", None, reason)]
    f_one = one_sample(f)
    # Forward-over-reverse per sample, as in the torch.func documentation's hvp recipe.
    per_sample = vmap(lambda xi, vi: jvp(jacrev(f_one), (xi,), (vi,))[1])
    return [Baseline(name, "tutorial", lambda: per_sample(x, v))]


def _hessian_diag(f, x, v, probes: Probes) -> list[Baseline]:
    return [
        _hessian_per_sample(f, x, probes, "vmap(hessian) diagonal", lambda h: _diagonal(h, x)),
        _hessian_full(f, x, probes, "full-batch Hessian diagonal", lambda d: d),
    ]


def _laplacian(f, x, v, probes: Probes) -> list[Baseline]:
    return [
        _hessian_per_sample(f, x, probes, "vmap(hessian) trace", lambda h: _trace(_diagonal(h, x), x)),
        _hessian_full(f, x, probes, "full-batch Hessian trace", lambda d: _trace(d, x)),
    ]
