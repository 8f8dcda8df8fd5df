"""Tolerances by dtype and the NaN-aware comparison used to cross-check strategies."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Relative tolerance, applied to the largest finite magnitude of the reference: strategies sum
# in different orders, so they differ by a few ulps of the largest entries, not of each entry.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for results of this dtype (float32 if unknown)."""
    return _TOLERANCE.get(dtype, 1e-4)


def max_difference(a: Tensor, b: Tensor) -> float:
    """Largest |a - b| over positions where both are finite (inf for mismatched NaN/inf)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach(), b.detach()
    if a.numel() == 0:
        return 0.0
    fast = float((a - b).abs_().max())  # one pass when all is finite (NaN or inf send it below)
    if math.isfinite(fast):
        return fast
    same_special = (a.isnan() & b.isnan()) | ((a == b) & a.isinf())
    finite = a.isfinite() & b.isfinite()
    if bool((~(same_special | finite)).any()):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    return float((a[finite] - b[finite]).abs().max())


def finite_abs_max(b: Tensor) -> float:
    """Largest finite |b| (0 if there is none)."""
    b = b.detach()
    if b.numel() == 0:
        return 0.0
    low, high = b.aminmax()
    fast = max(-float(low), float(high))
    if math.isfinite(fast):
        return fast
    finite = b[b.isfinite()]
    return float(finite.abs().max()) if finite.numel() else 0.0


def agree(a: Tensor, b: Tensor) -> tuple[bool, float, float]:
    """Whether a matches the reference b: (ok, max difference, allowed difference).

    NaN positions must match, infinities must match with sign, and finite values must be
    within the dtype's tolerance of the reference's largest finite magnitude.
    """
    diff = max_difference(a, b)
    allowed = tolerance(b.dtype) * finite_abs_max(b) + torch.finfo(b.dtype).tiny
    return diff <= allowed, diff, allowed
