"""Large results on CPU: backed by transparent huge pages where the system offers them on request.

A result of hundreds of megabytes (the Jacobian of a 512 -> 512 map at B=512 is 537 MB) is mapped
fresh from the system at every call, and touching it faults in one 4 KB page at a time: on the
development machine that took longer than the matrix products that fill it. Advising the kernel to
back the buffer with 2 MB pages (Linux, transparent_hugepage in "madvise" mode) faults it in 512x
fewer steps. Elsewhere, or if anything fails, this is a plain torch.empty.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
LARGE = 64 << 20  # bytes from which a result is worth advising
_MADV_HUGEPAGE = 14


def empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialized tensor of this shape with like's dtype and device; large CPU ones advised
    to use huge pages (see the module docstring)."""
    size = math.prod(shape) * like.element_size()
    if like.device.type != "cpu" or size < LARGE or not _advisable():
        return like.new_empty(shape)
    try:
        raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
        start = raw.data_ptr()
        aligned = (start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
        length = (size // HUGE_PAGE) * HUGE_PAGE
        if _libc().madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), _MADV_HUGEPAGE) != 0:
            return like.new_empty(shape)
        offset = aligned - start
        return raw[offset: offset + size].view(like.dtype).view(shape)
    except Exception:  # any platform where this does not hold: the ordinary allocation
        return like.new_empty(shape)


@functools.lru_cache(maxsize=1)
def _advisable() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            return "[madvise]" in file.read()
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc
