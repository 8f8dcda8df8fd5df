"""The examples in examples/ run and do what they say."""

import importlib.util
from pathlib import Path

import torch

from autojac import demo

from helpers import assert_close, loop_hessian, second_order_reference

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_poisson_pinn_trains_through_autojac_laplacians():
    pinn = _load("pinn_poisson")
    model, losses = pinn.train(steps=40, points=32)
    assert losses[-1] < 0.1 * losses[0]
    assert min(losses[-10:]) < min(losses[:10])
    # the residual it minimizes uses the true second derivative of the network
    x = torch.linspace(0, 1, 5)[:, None]
    u_xx = pinn.autojac.laplacian(model, x)
    assert_close(u_xx, second_order_reference("laplacian", loop_hessian(model, x), (1,)))


def test_the_demos_laplacian_baselines_agree_with_autojac():
    example = demo.second_order_example()
    example = demo.Example(example.title, example.f, example.x[:16])
    expected = second_order_reference("laplacian", loop_hessian(example.f, example.x), (2,))
    for name, baseline in demo.laplacian_baselines(example).items():
        assert_close(baseline().reshape(expected.shape), expected)
