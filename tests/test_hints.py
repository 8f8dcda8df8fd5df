"""Mistakes named with their fix: a chunk for a strategy that takes none, and one sample passed
without its batch dimension."""

from __future__ import annotations

import pytest
import torch

import autojac
from autojac.models import OPS
from autojac.strategies import registry

from helpers import assert_close, loop_jacobian

UNCHUNKED = [(op, s.name) for op in OPS for s in registry.for_op(op) if s.basis is None]
CALLS = {"jacobian": autojac.jacobian, "hessian": autojac.hessian, "hessian_diag": autojac.hessian_diag,
         "laplacian": autojac.laplacian, "hvp": lambda f, x, **kw: autojac.hvp(f, x, torch.randn_like(x), **kw),
         "divergence": autojac.divergence, "derivatives": autojac.derivatives}


@pytest.mark.parametrize("op, name", UNCHUNKED, ids=[f"{op}-{name}" for op, name in UNCHUNKED])
def test_a_chunk_for_a_strategy_without_a_basis_is_refused(op, name):
    with pytest.raises(ValueError) as refused:
        CALLS[op](torch.nn.Linear(3, 3), torch.randn(4, 3), strategy=f"{name}[chunk=16]")
    message = str(refused.value)
    assert message.startswith(f"strategy '{name}[chunk=16]': {name} takes no chunk")
    assert f"use strategy='{name}'" in message


def test_a_chunk_for_a_strategy_with_a_basis_is_used():
    assert ("jacobian", "loop_rev") in UNCHUNKED
    f, x = torch.nn.Linear(5, 10), torch.randn(4, 5)
    assert_close(autojac.jacobian(f, x, strategy="sum_rev[chunk=3]"), loop_jacobian(f, x))


def test_one_sample_without_its_batch_dimension_gets_a_hint():
    with pytest.raises(ValueError) as refused:  # f runs, but its output is not a batch of 5
        autojac.jacobian(torch.nn.Linear(5, 10), torch.randn(5))
    assert str(refused.value).startswith("f returned shape (10,) for a batch of 5; ")
    assert "x needs a batch dimension: x.unsqueeze(0) for one sample (shape (1, 5))" in str(refused.value)
    with pytest.raises(ValueError) as refused:  # f fails on it
        autojac.hessian(torch.nn.Linear(3, 2), torch.randn(5), tune=False)
    assert str(refused.value).startswith("f failed on x of shape (5,): RuntimeError: ")
    assert "x.unsqueeze(0)" in str(refused.value) and isinstance(refused.value.__cause__, RuntimeError)


def test_the_hint_is_only_for_an_x_of_one_dimension():
    with pytest.raises(ValueError) as refused:  # batched x: the plain message
        autojac.jacobian(lambda x: x.sum(0), torch.randn(4, 3))
    assert "for a batch of 4" in str(refused.value) and "unsqueeze" not in str(refused.value)
    with pytest.raises(RuntimeError):  # f's own error, as it was
        autojac.jacobian(torch.nn.Linear(3, 2), torch.randn(4, 5))
    x = torch.randn(5)  # a batch of 5 scalars is a batch: no error
    assert_close(autojac.jacobian(torch.sin, x), torch.cos(x))
