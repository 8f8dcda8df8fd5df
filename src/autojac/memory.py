"""How much memory a candidate may use: free device memory (CUDA) or available RAM (CPU)."""

from __future__ import annotations

import os

import torch

SAFETY = 0.5  # estimates are rough: a candidate may plan on half of what is free
# On a CPU a strategy whose whole basis needs more than this is first tried in chunks: its
# vectorized passes then stay in the caches (measured: sum_rev on a 512 -> 64 -> 64 -> 512 MLP
# at B=32, 209 MB estimated, runs 2.5x faster at chunk=64). A GPU wants the whole basis.
CPU_CHUNK_FIRST_BYTES = 64 * 2**20


def chunk_first_above(device: torch.device) -> int | None:
    """The memory estimate above which a strategy is first tried chunked on `device` (None: never)."""
    return CPU_CHUNK_FIRST_BYTES if device.type == "cpu" else None


def available_bytes(device: torch.device) -> int | None:
    """Free memory for new tensors on `device`, or None if it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks the caching allocator holds but does not use are free to PyTorch too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return _available_ram()
    return None


def budget_bytes(device: torch.device) -> int | None:
    """The most bytes one candidate's estimate may come to; None means unlimited."""
    free = available_bytes(device)
    return None if free is None else int(free * SAFETY)


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
