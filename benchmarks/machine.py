"""What the run measures about the machine: its name, and its matmul FLOP/s (the ceiling);
and FLOPs of one call, counted with torch.utils.flop_counter.FlopCounterMode."""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
from collections.abc import Callable

import torch

import autojac
from autojac.signature import device_name
from autojac.timing import clock_for, compare

from .schema import Machine


def slug(text: str) -> str:
    """'AMD EPYC 7B13' -> 'amd-epyc-7b13': safe in a file name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


def matmul_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], min_time: float) -> float:
    """The best FLOP/s of square matmuls of these sizes (2 n^3 FLOPs each)."""
    clock = clock_for(device)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = compare({"mm": lambda: torch.mm(a, b)}, clock, min_time=min_time)["mm"].median
        best = max(best, 2 * n**3 / seconds)
    return best


def load_average() -> list[float]:
    """os.getloadavg(), or [] where the platform has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return []


BUSY = "the machine was busy"


def busy_note(load: list[float], cpus: int, when: str, own: int = 0) -> str:
    """A warning for the results when other work was running: a 1-minute load average over half
    the CPUs, not counting the `own` threads the benchmark itself kept busy (at its end, the
    load average is mostly its own)."""
    if load and load[0] - min(own, cpus) > 0.5 * cpus:
        mine = f", {min(own, cpus)} of it this run's" if own else ""
        return (f"{BUSY} {when} (load average {load[0]:.1f} on {cpus} CPUs{mine}): other processes "
                f"competed for the cores, so these timings are unreliable; rerun on a quiet machine")
    return ""


def describe(device: torch.device, dtypes: list[str], quick: bool) -> Machine:
    """The machine record, with the matmul ceiling measured for each dtype."""
    name = device_name(device)
    if device.type == "cuda":
        sizes = (2048, 4096) if quick else (2048, 4096, 8192)  # a GPU needs large matrices to saturate
    else:
        sizes = (512, 1024) if quick else (512, 1024, 2048)
    ceiling = {d: matmul_flops(device, getattr(torch, d), sizes, 0.1 if quick else 0.5) for d in dtypes}
    return Machine(
        device=device.type, device_name=name, slug=slug(f"{device.type}-{name}"), hostname=socket.gethostname(),
        platform=platform.platform(), python=sys.version.split()[0], torch=torch.__version__,
        autojac=autojac.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count() or 1,
        load_average=load_average(), matmul_flops=ceiling,
    )


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks make autograd.grad
    fail under vmap ('A leaf node was passed to _will_engine_execute_node'); totals need no modules."""

    parents = {"Global"}

    def __enter__(self) -> _NoModuleTracking:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn, as FlopCounterMode counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return int(counter.get_total_flops())
