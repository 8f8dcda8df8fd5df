"""The cross-check comparison: finite values within the dtype's tolerance, NaN and inf matched."""

import math

import pytest
import torch

from autojac.numerics import agree, finite_abs_max, max_difference, tolerance

INF, NAN = float("inf"), float("nan")


def test_finite_values_differ_by_their_largest_gap():
    a = torch.tensor([1.0, -2.0, 3.0])
    assert max_difference(a, a + torch.tensor([0.0, 0.25, -0.5])) == 0.5
    assert max_difference(a, a.view(3, 1)) == INF  # shapes must match
    assert max_difference(torch.empty(0, 2), torch.empty(0, 2)) == 0.0


@pytest.mark.parametrize("other, expected", [
    ([1.5, INF, NAN, 2.0], 0.5),      # the same special values in the same places: only the finite gap counts
    ([1.0, -INF, NAN, 2.0], INF),     # an infinity of the other sign
    ([1.0, INF, 7.0, 2.0], INF),      # NaN against a number
    ([NAN, INF, NAN, 2.0], INF),      # NaN where a has a number
])
def test_special_values_must_match_in_place(other, expected):
    a = torch.tensor([1.0, INF, NAN, 2.0])
    assert max_difference(a, torch.tensor(other)) == expected


def test_finite_abs_max_ignores_special_values():
    assert finite_abs_max(torch.tensor([-3.0, 1.0, INF])) == 3.0
    assert finite_abs_max(torch.tensor([NAN, -INF])) == 0.0
    assert finite_abs_max(torch.empty(0)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agree_scales_the_tolerance_by_the_largest_finite_magnitude(dtype):
    b = torch.tensor([1000.0, 1.0, INF], dtype=dtype)
    allowed = tolerance(dtype) * 1000.0
    ok, diff, limit = agree(b + torch.tensor([0.0, 0.9 * allowed, 0.0], dtype=dtype), b)
    assert ok and math.isclose(limit, allowed, rel_tol=1e-6) and diff == pytest.approx(0.9 * allowed, rel=1e-3)
    assert not agree(b + torch.tensor([0.0, 2 * allowed, 0.0], dtype=dtype), b)[0]


def test_results_zero_up_to_rounding_agree_with_a_floor_on_their_scale():
    # the Laplacian of a nearly linear f: both are 0 up to rounding, differing by as much again
    a, b = torch.tensor([1.7e-15, -3e-16], dtype=torch.float64), torch.tensor([1e-16, 0.0], dtype=torch.float64)
    assert agree(a, b, order=2)[0]
    assert not agree(torch.tensor([1e-3], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))[0]
