"""Sharing plans across torch.distributed ranks: rank 0 decides, the other ranks read its plan.

When a process group is initialized (world size > 1), rank 0 makes plans as usual (tuning,
writing the cache) and publishes each plan's JSON under its key in the process group's
key-value store the first time it resolves that signature in the group (also a plan it made
before the group existed). Another rank that misses its own
memory and cache waits for that key instead of tuning, so every rank runs the same strategy,
only rank 0 benchmarks and only rank 0 writes the cache. A rank that already has the plan does
not wait at all (nothing collective happens). A rank that waits longer than
AUTOJAC_DIST_TIMEOUT seconds (default 60) for rank 0 uses the heuristic choice and warns.

Plans travel as JSON and are validated like a cache file: no pickle, no code.
"""

from __future__ import annotations

import datetime
import os
import threading

import torch
import torch.distributed as dist
from pydantic import ValidationError

from .models import Plan
from .strategies import registry

DEFAULT_TIMEOUT = 60.0
_PREFIX = "autojac/plan/"
_AVAILABLE = dist.is_available()
_published: set[tuple[int, str]] = set()  # (the group's store, plan key): a new group needs the plans again
_guard = threading.Lock()


_is_initialized = dist.is_initialized if _AVAILABLE else (lambda: False)


def group_started() -> bool:
    """Whether a process group is initialized (cheap: asked on every cached call)."""
    return _is_initialized()


def active() -> bool:
    """Whether a process group of more than one rank is initialized."""
    return group_started() and dist.get_world_size() > 1


def is_follower() -> bool:
    """Whether this process is a rank other than 0 in an initialized group."""
    return active() and dist.get_rank() != 0


def publish(plan: Plan) -> None:
    """On rank 0: make `plan` available to the other ranks (once per key and process)."""
    if not active() or dist.get_rank() != 0:
        return
    store = _store()
    with _guard:
        if (id(store), plan.key) in _published:
            return
        _published.add((id(store), plan.key))
    store.set(_PREFIX + plan.key, plan.model_dump_json())


def fetch(key: str, op: str) -> tuple[Plan | None, str]:
    """On a follower: rank 0's plan for `key`, waiting for it; or (None, why not)."""
    timeout = timeout_seconds()
    store = _store()
    try:
        store.wait([_PREFIX + key], datetime.timedelta(seconds=timeout))
        text = store.get(_PREFIX + key)
    except RuntimeError as error:  # DistStoreError on timeout is a RuntimeError
        return None, f"rank 0 published no plan within {timeout:g} s (AUTOJAC_DIST_TIMEOUT): {error}"
    try:
        plan = Plan.model_validate_json(text)
        registry.get(plan.strategy, op)
    except (ValidationError, ValueError) as error:
        return None, f"rank 0's plan for {key} is not valid here: {str(error).splitlines()[0]}"
    if plan.key != key or plan.op != op:
        return None, f"rank 0 published a plan for {plan.op} {plan.key} under {key}"
    return plan, ""


def timeout_seconds() -> float:
    text = os.environ.get("AUTOJAC_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"AUTOJAC_DIST_TIMEOUT={text!r} is not a number; expected seconds, e.g. 60") from None
    if not value > 0:
        raise ValueError(f"AUTOJAC_DIST_TIMEOUT={text!r} must be positive (seconds)")
    return value


def _store() -> dist.distributed_c10d.Store:
    # The group's own store (TCPStore/FileStore behind a prefix), shared by every rank.
    return dist.distributed_c10d._get_default_store()
