"""A torch.compile'd f is probed and tuned through the callable it compiles, so that compile time
is never measured as a strategy's time; its calls run the winning strategy on the compiled one.

The compiling backend here only counts compilations (and runs the captured graph as is): the
default backend (inductor) proves nothing more and takes seconds per compilation on a CPU."""

from __future__ import annotations

import functools

import pytest
import torch

import autojac
from autojac.compiled import original

from helpers import assert_close, loop_jacobian, mlp

pytest.importorskip("torch._dynamo")


class Counting:
    """A torch.compile backend that counts the graphs it is given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return graph.forward


def test_original_unwraps_what_torch_compile_returns():
    net = mlp(5, 3)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z).sin()

    assert original(torch.compile(net, backend="eager")) is net
    assert original(torch.compile(f, backend="eager")) is f
    assert original(net) is net and original(f) is f


def test_a_compiled_module_is_tuned_uncompiled_and_called_compiled():
    net, x = mlp(5, 3), torch.randn(8, 5)
    backend, calls = Counting(), []
    compiled = torch.compile(net, backend=backend)
    compiled.register_forward_pre_hook(lambda module, args: calls.append("compiled"))
    net.register_forward_pre_hook(lambda module, args: calls.append("original"))
    plan = autojac.explain(compiled, x)  # probes and tuning run the original: nothing compiles
    assert plan.tuned and plan.timings and plan.fn_name == "OptimizedModule"
    assert backend.graphs == 0 and "compiled" not in calls and "original" in calls
    expected = loop_jacobian(net, x)
    calls.clear()
    assert_close(autojac.jacobian(compiled, x), expected)  # the winning strategy, on the compiled module
    assert calls[0] == "compiled"
    assert autojac.explain(compiled, x) == plan  # its plan: found, not made again


def test_a_compiled_function_is_tuned_uncompiled():
    net, x = mlp(5, 3), torch.randn(8, 5)
    backend = Counting()

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z) * 2

    compiled = torch.compile(f, backend=backend)
    plan = autojac.explain(compiled, x)
    assert plan.tuned and backend.graphs == 0
    assert_close(autojac.jacobian(compiled, x), 2 * loop_jacobian(net, x))
    assert autojac.explain(compiled, x) == plan


def test_a_wrapper_of_a_compiled_function_is_not_skipped():
    net, x = mlp(5, 3), torch.randn(8, 5)
    compiled = torch.compile(lambda z: net(z), backend="eager")

    @functools.wraps(compiled)  # copies dynamo's attributes onto g
    def g(z: torch.Tensor) -> torch.Tensor:
        return compiled(z) * 3

    assert original(g) is g
    assert_close(autojac.jacobian(g, x), 3 * loop_jacobian(net, x))
