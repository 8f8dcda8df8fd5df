"""Tolerances by dtype and the NaN-aware comparison used to cross-check strategies."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Relative tolerance, applied to the largest finite magnitude of the reference: strategies sum
# in different orders, so they differ by a few ulps of the largest entries, not of each entry.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# Second derivatives are sums of products of first ones and cancel more (a hard-constrained PINN's
# Laplacian in float32 at B=2048: strategies differ by 1.8e-4 of its largest entry).
SECOND_ORDER_FACTOR = 10.0
# The smallest magnitude tolerances are relative to: the Laplacian of a nearly linear f is zero up
# to rounding (1e-15 in float64), where strategies differ by as much again.
SCALE_FLOOR = 1e-6


def tolerance(dtype: torch.dtype, order: int = 1) -> float:
    """Relative tolerance for results computed in this dtype (float32 if unknown), of derivatives of
    this order."""
    return _TOLERANCE.get(dtype, 1e-4) * (SECOND_ORDER_FACTOR if order > 1 else 1.0)


def computation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise of the floating dtypes a result went through (x's, f's output's, autocast's):
    a float64 x fed to a float32 model is only as exact as float32."""
    floating = [d for d in dtypes if d.is_floating_point]
    if torch.is_autocast_enabled("cpu"):
        floating.append(torch.get_autocast_dtype("cpu"))
    if torch.cuda.is_available() and torch.is_autocast_enabled("cuda"):
        floating.append(torch.get_autocast_dtype("cuda"))
    return max(floating, key=lambda d: _TOLERANCE.get(d, 1e-4)) if floating else torch.float32


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


def agree(a: Tensor | tuple[Tensor, ...], b: Tensor | tuple[Tensor, ...], dtype: torch.dtype | None = None,
          order: int = 1) -> tuple[bool, float, float]:
    """Whether a matches the reference b: (ok, max difference, allowed difference).

    NaN positions must match, infinities must match with sign, and finite values must be
    within the tolerance of `dtype` (the dtype the results were computed in; b's by default) and
    of derivatives of `order`, relative to the reference's largest finite magnitude. Tuples of
    results (several quantities) agree where every pair does; the worst pair is reported.
    """
    if isinstance(a, tuple) or isinstance(b, tuple):
        if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)):
            return False, float("inf"), 0.0
        verdicts = [agree(x, y, dtype, order) for x, y in zip(a, b)]
        return all(v[0] for v in verdicts), *max(verdicts, key=lambda v: (not v[0], v[1] - v[2]))[1:]
    diff = max_difference(a, b)
    scale = max(finite_abs_max(b), SCALE_FLOOR)  # a result that is zero up to rounding (f linear) has no scale
    allowed = tolerance(b.dtype if dtype is None else dtype, order) * scale
    return diff <= allowed, diff, allowed
