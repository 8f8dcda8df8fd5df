"""Plans as things to manage: list them, pre-warm them, export them, import them, clear them.

All of these act on the process-wide planner and its store (by default the disk cache in
AUTOJAC_CACHE_DIR, plus the read-only files of AUTOJAC_PLANS).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import api, config
from .calls import arg_dims, dims_values
from .cache import DiskStore, EnvironmentStore, read_plan_file, unusable_reason, write_plan_file
from .models import Op, Plan
from .planner import default_planner
from .problem import BatchedFn, check_x
from .signature import TORCH_VERSION
from .store import MergeCounts
from .strategies import registry


@dataclasses.dataclass(frozen=True)
class ImportCounts(MergeCounts):
    """What `import_plans` did with each entry of the file: added, replaced or kept as merged
    into the cache, or skipped."""

    invalid: int = 0  # not a valid plan, or a strategy this autojac does not know for its op
    foreign: int = 0  # made with another torch version: never used here

    @property
    def skipped(self) -> int:
        return self.invalid + self.foreign

    def __str__(self) -> str:
        return f"{super().__str__()}, {self.invalid} invalid, {self.foreign} from another torch version"


def plans(op: Op | None = None, device: str | torch.device | None = None) -> list[Plan]:
    """Every plan that would be used here (the user cache's and AUTOJAC_PLANS'), optionally only
    those of one operation (`"jacobian"`, ...) or device type (`"cpu"`, `"cuda"`, `"cuda:1"` means
    `"cuda"`); sorted by operation, function, shape and time of creation."""
    kind = None if device is None else torch.device(device).type
    found = [plan for plan in default_planner().store.plans()
             if (op is None or plan.op == op) and (kind is None or plan.device == kind)]
    return sorted(found, key=lambda p: (p.op, p.fn_name, p.dtype, p.in_shape, p.batch_size, p.created))


def cache_path() -> Path | None:
    """The user cache file (which may not exist yet); None when the planner keeps plans only
    in memory (a store other than the disk cache)."""
    store = default_planner().store
    if isinstance(store, EnvironmentStore):
        store = store.current
    return store.path if isinstance(store, DiskStore) else None


def clear_cache() -> int:
    """Forget every plan in the user cache (on disk and in this process); returns how many there
    were. Files named by AUTOJAC_PLANS are read-only and left alone."""
    planner = default_planner()
    count = planner.store.clear()
    planner.forget()
    return count


def export_plans(path: str | os.PathLike[str]) -> int:
    """Write every stored plan (the user cache's and AUTOJAC_PLANS') to a plan file at `path`,
    atomically; returns how many. Ship it with AUTOJAC_PLANS=path, or `autojac import path`."""
    found = stored_plans()
    write_plan_file(Path(path), found)
    return len(found)


def stored_plans() -> list[Plan]:
    """Every valid plan the store holds, usable here or not (other torch versions, strategies
    this autojac lacks): what an export carries."""
    store = default_planner().store
    return store.stored() if isinstance(store, (DiskStore, EnvironmentStore)) else store.plans()


def import_plans(path: str | os.PathLike[str]) -> ImportCounts:
    """Merge the plans of a plan file into the user cache: for each signature a tuned plan beats a
    heuristic one, then the newer wins. Entries that are not valid plans or name a strategy this
    autojac does not know are skipped and counted, as are plans of another torch version.

    Raises PlanFileError if the file as a whole is not a plan file (or is too large), and
    FileNotFoundError if it does not exist.
    """
    loaded = read_plan_file(Path(path))
    usable, invalid, foreign = [], loaded.invalid, 0
    for plan in loaded.plans.values():
        if plan.torch_version != TORCH_VERSION:
            foreign += 1
        elif unusable_reason(plan):
            invalid += 1
        else:
            usable.append(plan)
    planner = default_planner()
    merged = planner.store.merge(usable)
    planner.forget()  # imported plans may be preferred to those memoized
    return ImportCounts(**dataclasses.asdict(merged), invalid=invalid, foreign=foreign)


def warm(f: BatchedFn, x: api.Inputs, ops: Sequence[Op] = ("jacobian",), *, batch_sizes: Sequence[int] | None = None,
         quantities: Sequence[api.Quantity] = ("value", "jacobian", "laplacian"), **kwargs: Any) -> list[Plan]:
    """Make the plans of `ops` for f at a batch shaped like x now (tuning unless tune=False is
    given, even under AUTOJAC_TUNE=0 or AUTOJAC_REQUIRE_PLAN=1), and store them. A signature that
    already has a tuned plan is not tuned again. With `batch_sizes`, the plans of each of those
    batch sizes (x's samples repeated or cut to make them; a call at a batch size within 2x of a
    warmed one reuses its plan untimed). Other keyword arguments (create_graph=,
    batch_independent=, v=, args=, in_dims=, dims=, has_aux=) go to `autojac.explain`; for "hvp"
    without v, a random v shaped like x is used (the plan does not depend on v's values).
    `quantities` are the ones "derivatives" in ops computes (derivatives' own ops=).
    x may be a tuple of inputs, as in `autojac.jacobian(f, (x, s))`. Returns the plans, one per
    op and batch size."""
    if isinstance(ops, str):
        raise TypeError(f"ops must be a sequence of operation names, e.g. ({ops!r},); got the string {ops!r}")
    known = operations()
    for op in ops:
        if op not in known:
            raise ValueError(f"unknown operation {op!r}; known: {', '.join(known)}")
    several = isinstance(x, (tuple, list))
    inputs = tuple(x) if several else (x,)
    if not inputs:
        raise ValueError("x is an empty sequence; give a tensor of shape (B, *in) or a tuple of them")
    for i, t in enumerate(inputs):
        check_x(t, f"x[{i}]" if several else "x")  # the message autojac.jacobian would give
    old = inputs[0].shape[0]
    sizes = [old] if batch_sizes is None else list(batch_sizes)
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes):
        raise ValueError(f"batch_sizes must be positive ints; got {batch_sizes!r}")
    kwargs.setdefault("tune", True)
    made = []
    with config.warming():
        for batch in sizes:
            resized = {**kwargs, **_resized_arguments(kwargs, old, batch)}
            resized_inputs = tuple(_resized(t, batch) for t in inputs)
            sample: api.Inputs = resized_inputs if several else resized_inputs[0]
            for op in ops:
                extra: dict[str, Any] = {"ops": quantities} if op == "derivatives" else {}
                if op == "hvp" and resized.get("v") is None:  # with dims, v has one entry per chosen coordinate
                    dims = resized.get("dims")
                    first = resized_inputs[0]
                    shape = first.shape if dims is None else (batch, len(dims_values(dims)))
                    extra["v"] = torch.randn(shape, dtype=first.dtype, device=first.device)
                plan = api.plan_for(op, f, sample, **resized, **extra, nearby=False)
                default_planner().store.put(plan)  # a plan memoized before AUTOJAC_CACHE_DIR changed, too
                made.append(plan)
    return made


def _resized(t: Tensor, batch: int, dim: int = 0) -> Tensor:
    """t with `batch` entries along dim: its samples repeated in turn, or the first ones."""
    if t.shape[dim] == batch:
        return t
    return t.index_select(dim, torch.arange(batch, device=t.device) % t.shape[dim])


def _resized_arguments(kwargs: dict[str, Any], old: int, batch: int) -> dict[str, Any]:
    """v and the per-sample extra arguments of a warm call at another batch size."""
    if batch == old:
        return {}
    changed: dict[str, Any] = {}
    if isinstance(kwargs.get("v"), Tensor):
        changed["v"] = _resized(kwargs["v"], batch)
    args = tuple(kwargs.get("args", ()))
    if args:
        dims = arg_dims(kwargs.get("in_dims"), args, old)
        changed["args"] = tuple(a if d is None else _resized(a, batch, d) for a, d in zip(args, dims))
    return changed


def operations() -> list[str]:
    """The operations some registered strategy serves, sorted."""
    return sorted({op for strategy in registry.all_strategies() for op in strategy.ops})



