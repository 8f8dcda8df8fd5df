"""Review 5: real user code against independent references (torch.func, per-sample loops)."""

import pytest
import torch
from torch.func import jacrev, vmap

import autojac
from autojac.cache import default_store
from autojac.planner import Planner, set_default_planner

NET = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def two_inputs(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return NET(torch.cat([x, s], 1))


def test_warm_takes_a_tuple_of_inputs_as_the_call_and_its_error_do(monkeypatch):
    # PlanRequiredError tells a tuple-input call to run autojac.warm(f, x) with x the tuple
    x, s = torch.randn(10, 3), torch.randn(10, 1)
    plans = autojac.warm(two_inputs, (x, s), ops=("jacobian",), batch_sizes=[10, 40])
    assert [p.batch_size for p in plans] == [10, 40]
    set_default_planner(Planner(default_store()))  # a new process: the plans come from the cache
    monkeypatch.setenv("AUTOJAC_REQUIRE_PLAN", "1")
    for batch in (10, 40):
        xb, sb = torch.randn(batch, 3), torch.randn(batch, 1)
        jx, js = autojac.jacobian(two_inputs, (xb, sb))
        rx, rs = vmap(jacrev(lambda a, b: two_inputs(a[None], b[None])[0], argnums=(0, 1)))(xb, sb)
        torch.testing.assert_close(jx, rx, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(js, rs, atol=1e-5, rtol=1e-4)


def test_warm_refuses_a_bad_tuple_element_by_name():
    with pytest.raises(TypeError, match=r"x\[1\] must be a torch.Tensor"):
        autojac.warm(two_inputs, (torch.randn(3, 3), 5))


@pytest.mark.parametrize("dims", [[[0]], [(0, 1)], [], [True]])
def test_dims_that_are_not_ints_are_refused_by_name(dims):
    # [[0]] used to reach an lru_cache and fail with "unhashable type: 'list'"
    with pytest.raises(TypeError, match=r"dims must be a non-empty sequence of int indices"):
        autojac.jacobian(two_inputs, torch.randn(4, 3), args=(torch.randn(4, 1),), dims=dims)


def test_vmap_refusal_names_a_shared_container_of_per_sample_tensors():
    # a dict of per-sample tensors is passed whole to every sample; the error used to give only
    # torch's "Sizes of tensors must match", with no hint of why or what to do
    def f(x, d):
        return NET(torch.cat([x, d["s"]], 1))

    x, s = torch.randn(6, 3), torch.randn(6, 1)
    with pytest.raises(ValueError, match=r"args\[0\] is a dict holding tensors of the batch size 6.*arguments of their own"):
        autojac.jacobian(f, x, args=({"s": s},), strategy="vmap_rev")
    reference = vmap(jacrev(lambda a, b: f(a[None], {"s": b[None]})[0]))(x, s)
    torch.testing.assert_close(autojac.jacobian(f, x, args=({"s": s},)), reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op", ["jacobian", "hessian", "hessian_diag", "laplacian", "divergence"])
def test_create_graph_on_an_empty_batch_is_in_the_graph_of_the_parameters(op):
    # a PINN term over points that a mask left empty: loss.backward() must work (zero gradients)
    square = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    for _ in range(2):  # the second call is served as the first
        with torch.no_grad():
            result = getattr(autojac, op)(square, torch.randn(0, 3), create_graph=True)
        assert result.shape[0] == 0 and result.requires_grad
        (gradient,) = torch.autograd.grad(result.sum(), square[0].weight)
        assert torch.equal(gradient, torch.zeros_like(gradient))
    value = autojac.jacobian(square, torch.randn(0, 3))
    assert not value.requires_grad
