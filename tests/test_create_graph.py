"""create_graph=True: every strategy of every operation gives a result whose gradients (of a loss built
on it, w.r.t. the model's parameters and x) equal those of an explicit per-sample reference loop."""

import functools

import pytest
import torch

from autojac.problem import Problem, Sizes
from autojac.strategies import for_op

from helpers import assert_close, loop_hessian, mlp, second_order_reference

OPS = ("jacobian", "hessian", "hvp", "hessian_diag", "laplacian")
STRATEGIES = [(op, s) for op in OPS for s in for_op(op)]


def _setup():
    torch.manual_seed(0)
    model = mlp(3, 2, width=6, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 3, dtype=torch.float64)
    return model, x, v


def _loop_jacobian_differentiable(f, x):
    return torch.stack([torch.autograd.functional.jacobian(lambda xi: f(xi.unsqueeze(0)).squeeze(0), x[b],
                                                           create_graph=True) for b in range(x.shape[0])])


def _gradients(model, x, result, weights):
    loss = (result * weights).sum() + (result ** 2).sum()
    return torch.autograd.grad(loss, [*model.parameters(), x], allow_unused=True, materialize_grads=True)


@functools.lru_cache(maxsize=None)
def _reference(op):
    model, x, v = _setup()
    if op == "jacobian":
        result = _loop_jacobian_differentiable(model, x)
    else:
        result = second_order_reference(op, loop_hessian(model, x, create_graph=True), (3,), v)
    weights = torch.randn(result.shape, dtype=result.dtype, generator=torch.Generator().manual_seed(1))
    return result.detach(), weights, [g.detach() for g in _gradients(model, x, result, weights)]


@pytest.mark.parametrize("op, strategy", STRATEGIES, ids=lambda s: getattr(s, "name", s))
def test_gradients_through_the_result_match_the_reference_loop(op, strategy):
    expected, weights, expected_grads = _reference(op)
    model, x, v = _setup()
    problem = Problem(op, model, x, v if op == "hvp" else None, create_graph=True)
    sizes = Sizes(batch=4, n=3, m=2, itemsize=8, activations=0)
    chunks = [None] + ([2] if strategy.basis is not None and strategy.chunk_options(sizes) else [])
    for chunk in chunks:
        result = strategy(problem, chunk)
        assert result.requires_grad, (strategy.name, chunk)
        assert_close(result.detach(), expected)
        grads = _gradients(model, x, result, weights)
        for got, want in zip(grads, expected_grads):
            assert_close(got, want)
    assert x.grad is None and all(p.grad is None for p in model.parameters())
