"""Odd and hostile inputs: each has a clear, tested outcome."""

import pytest
import torch

import autojac

from helpers import assert_close, loop_jacobian, mlp


def _nan_equal(actual, expected):
    assert torch.equal(actual.isnan(), expected.isnan())
    finite = expected.isfinite()
    assert torch.equal(actual.isinf(), expected.isinf())
    assert_close(actual[finite], expected[finite])


# With inf in x, forward and reverse mode disagree on where inf * 0 becomes NaN: the cross-check
# excludes the minority (forward mode) with a warning, and the majority matches the reference.
@pytest.mark.filterwarnings("ignore:autojac. candidate .* excluded")
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_in_x_propagate_like_the_reference(value):
    f = mlp(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    x[1, 2] = value
    result = autojac.jacobian(f, x)
    _nan_equal(result, loop_jacobian(f, x))
    plan = autojac.explain(f, x)
    assert plan.batch_independent  # NaN on sample 1 is not mistaken for coupling
    assert result[0].isfinite().all() and result[2:].isfinite().all()


def test_f_that_writes_into_x_is_refused_and_x_is_left_alone():
    def doubles_in_place(x):
        x.mul_(2)
        return x.sum(-1)

    def sneaky(x):
        with torch.no_grad():
            x.add_(1)  # autograd allows this one: the copy must show it
        return x * 2

    for f in (doubles_in_place, sneaky):
        x = torch.randn(3, 4)
        before = x.clone()
        with pytest.raises(ValueError, match="f modifies its input in place"):
            autojac.jacobian(f, x)
        assert torch.equal(x, before)


def test_non_contiguous_and_expanded_x():
    f = mlp(5, 3).double()
    transposed = torch.randn(5, 4, dtype=torch.float64).t()
    expanded = torch.randn(1, 5, dtype=torch.float64).expand(4, 5)
    for x in (transposed, expanded):
        assert not x.is_contiguous()
        assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))


def test_a_batch_of_one():
    f = mlp(5, 3).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
    assert autojac.explain(f, x).batch_independent


def test_x_requiring_grad_keeps_its_state_and_gets_no_grad():
    f = mlp(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    result = autojac.jacobian(f, x)
    assert x.requires_grad and x.grad is None and not result.requires_grad
    assert_close(result, loop_jacobian(f, x))
