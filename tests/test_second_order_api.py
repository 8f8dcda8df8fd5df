"""End-to-end tests of autojac.hessian, hvp, hessian_diag and laplacian."""

import copy

import pytest
import torch
from torch import nn

import autojac
from autojac.planner import heuristic_order
from autojac.problem import Sizes
from autojac.strategies import get, names, registry

from helpers import MatrixOut, assert_close, centered, coupled_hessian, data_dependent, loop_hessian, mlp, \
    second_order_reference

OPS = ("hessian", "hvp", "hessian_diag", "laplacian")


def call(op, f, x, v=None, **options):
    if op == "hvp":
        return autojac.hvp(f, x, v, **options)
    return getattr(autojac, op)(f, x, **options)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("factory, in_shape, out_shape, dtype", [
    (lambda: mlp(3, 2, width=8), (3,), (2,), torch.float32),
    (MatrixOut, (6,), (2, 3), torch.float64),
    (lambda: (lambda x: torch.sin(x).sum(-1)), (4,), (), torch.float64),
])
def test_each_operation_matches_the_per_sample_loop(op, factory, in_shape, out_shape, dtype):
    f = factory()
    f = f.to(dtype) if isinstance(f, nn.Module) else f
    x, v = torch.randn(5, *in_shape, dtype=dtype), torch.randn(5, *in_shape, dtype=dtype)
    result = call(op, f, x, v)
    tails = {"hessian": in_shape + in_shape, "hvp": in_shape, "hessian_diag": in_shape, "laplacian": ()}
    assert result.shape == (5, *out_shape, *tails[op]) and result.dtype == dtype and not result.requires_grad
    assert_close(result, second_order_reference(op, loop_hessian(f, x), in_shape, v))
    plan = autojac.explain(f, x, op=op, v=v if op == "hvp" else None)
    assert plan.op == op and plan.tuned and plan.strategy in names(op) and plan.label in plan.timings


def test_the_engine_is_a_candidate_for_every_f_it_has_rules_for():
    model, x = mlp(2, 1, width=16), torch.randn(64, 2)
    assert "jet_laplacian" in autojac.explain(model, x, op="laplacian").timings
    wrapped = lambda z: model(z)  # noqa: E731
    assert "jet_laplacian" in autojac.explain(wrapped, x, op="laplacian").timings
    unsupported = lambda z: torch.cumprod(model(z), 1)  # noqa: E731
    plan = autojac.explain(unsupported, x, op="laplacian")
    assert plan.excluded["jet_laplacian"] == "does not apply: no rule for torch.cumprod"
    with pytest.raises(ValueError, match="cannot be used for this f: it does not apply: no rule for torch.cumprod"):
        autojac.laplacian(unsupported, x, strategy="jet_laplacian")
    assert_close(autojac.laplacian(wrapped, x, strategy="jet_laplacian"), autojac.laplacian(model, x, strategy="loop_diag"))


@pytest.mark.parametrize("op", OPS)
def test_a_batch_coupled_function_gets_the_exact_diagonal_blocks(op):
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    result = call(op, centered, x, v)
    assert_close(result, second_order_reference(op, coupled_hessian(centered, x), (3,), v))
    plan = autojac.explain(centered, x, op=op, v=v if op == "hvp" else None)
    assert not plan.batch_independent and get(plan.strategy).coupled_only


def test_batchnorm_in_training_mode_gets_an_exact_hessian_and_keeps_its_running_stats():
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    twin = copy.deepcopy(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    result = autojac.hessian(model, x)
    twin(x)  # one ordinary forward
    assert torch.equal(model[1].running_mean, twin[1].running_mean)
    assert_close(result, coupled_hessian(copy.deepcopy(twin), x))


@pytest.mark.parametrize("op", OPS)
def test_a_function_that_fails_under_vmap_still_gets_a_correct_answer(op):
    x, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert_close(call(op, data_dependent, x, v), second_order_reference(op, loop_hessian(data_dependent, x), (4,), v))
    plan = autojac.explain(data_dependent, x, op=op, v=v if op == "hvp" else None)
    assert not plan.vmap_ok
    assert all("vmap" in plan.excluded[s.name] for s in registry.for_op(op) if registry.VMAP in s.needs)


@pytest.mark.parametrize("op", OPS)
def test_create_graph_results_train_the_parameters_like_the_reference(op):
    model, x = mlp(2, 1, width=8, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    v = torch.randn(6, 2, dtype=torch.float64)
    result = call(op, model, x, v, create_graph=True)
    expected = second_order_reference(op, loop_hessian(model, x, create_graph=True), (2,), v)
    params = list(model.parameters())  # the last bias does not reach second derivatives: zero gradient
    got = torch.autograd.grad(result.square().sum(), params, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(expected.square().sum(), params, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, want):
        assert_close(a, b)
    plan = autojac.explain(model, x, op=op, v=v if op == "hvp" else None, create_graph=True)
    assert plan.create_graph and plan.tuned
    assert all(p.grad is None for p in model.parameters())  # tuning's backward passes touch no .grad


def test_tuning_with_create_graph_times_a_backward_pass_through_the_result(monkeypatch):
    backward_calls = []

    class Counted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            backward_calls.append(1)
            return grad

    def counted(p, chunk):
        return Counted.apply(get("loop_diag").run(p, chunk))

    model, x = mlp(3, 1, width=4), torch.randn(4, 3)
    # tried first, so that the tuning budget cannot run out before it
    monkeypatch.setitem(registry._HEURISTICS, "laplacian", lambda sizes: ["counted_for_test"])
    with registry.temporary() as reg:
        reg.add(registry.Strategy(name="counted_for_test", ops=frozenset({"laplacian"}), run=counted,
                                  memory=lambda s, c: 0, autograd=True))
        plan = autojac.explain(model, x, op="laplacian")
        assert "counted_for_test" in plan.timings and not backward_calls
        plan = autojac.explain(model, x, op="laplacian", create_graph=True)
        assert "counted_for_test" in plan.timings and len(backward_calls) >= 2
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("op", OPS)
def test_an_empty_batch_gives_an_empty_result_of_the_right_shape(op):
    x = torch.randn(0, 3)
    shapes = {"hessian": (0, 2, 3, 3), "hvp": (0, 2, 3), "hessian_diag": (0, 2, 3), "laplacian": (0, 2)}
    assert call(op, mlp(3, 2), x, torch.randn(0, 3)).shape == shapes[op]


@pytest.mark.parametrize("op", OPS)
def test_with_tuning_off_the_heuristics_first_applicable_strategy_runs(op):
    f, x, v = mlp(3, 2), torch.randn(4, 3), torch.randn(4, 3)
    assert_close(call(op, f, x, v, tune=False), second_order_reference(op, loop_hessian(f, x), (3,), v))
    plan = autojac.explain(f, x, op=op, v=v if op == "hvp" else None, tune=False)
    order = heuristic_order(op, Sizes(4, 3, 2, 4, 0))
    assert not plan.tuned and plan.timings == {} and plan.strategy == order[0]


def test_heuristic_tables_name_registered_strategies():
    for op in OPS:
        for sizes in (Sizes(32, 2, 1, 4, 0), Sizes(512, 128, 8, 4, 0), Sizes(512, 128, 1, 4, 0, create_graph=True),
                      Sizes(32, 16, 8, 4, 0, create_graph=True)):
            order = heuristic_order(op, sizes)
            assert set(order) == set(names(op)) and len(order) == len(set(order))


def test_the_heuristic_knows_whether_the_result_must_stay_differentiable():
    f, x = (lambda z: torch.cumprod(torch.sin(z), -1)[..., -1]), torch.randn(4, 20)  # (no engine rule: cumprod)
    assert autojac.explain(f, x, op="hessian", tune=False).strategy == "sum_grad_grad"
    # differentiating a vmapped double backward again is slow: another order when create_graph
    assert autojac.explain(f, x, op="hessian", tune=False, create_graph=True).strategy == "vmap_rev_rev"


def test_x_and_its_graph_are_left_untouched():
    f = mlp(3, 2)
    leaf = torch.randn(4, 3, requires_grad=True)
    x = leaf * 2
    result = autojac.hessian(f, x)
    assert not result.requires_grad and x.grad_fn is not None
    x.sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(leaf, 2.0))
    assert all(p.grad is None for p in f.parameters())


@pytest.mark.parametrize("v, error, message", [
    (torch.randn(4, 2), ValueError, r"v has shape \(4, 2\) but x has shape \(4, 3\); v is one direction per sample"),
    (torch.randn(4, 3, dtype=torch.float64), ValueError, r"v is torch.float64 on cpu but x is torch.float32"),
    (torch.randn(4, 3, device="meta"), ValueError, r"v is on the meta device"),
    ([[1.0, 2.0, 3.0]], TypeError, r"v must be a torch.Tensor"),
    (torch.ones(4, 3, dtype=torch.int64), TypeError, r"v has dtype torch.int64"),
])
def test_a_bad_direction_is_refused(v, error, message):
    with pytest.raises(error, match=message):
        autojac.hvp(mlp(3, 2), torch.randn(4, 3), v)


def test_explain_checks_the_operation_and_its_direction():
    f, x = mlp(3, 2), torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown operation 'hessain'; known: jacobian, hessian, hvp"):
        autojac.explain(f, x, op="hessain")
    with pytest.raises(TypeError, match="op='hvp' needs v"):
        autojac.explain(f, x, op="hvp")
    with pytest.raises(ValueError, match="v is used only by op='hvp'"):
        autojac.explain(f, x, op="laplacian", v=torch.randn(4, 3))


@pytest.mark.parametrize("op", OPS)
def test_bad_inputs_and_outputs_are_refused_as_for_the_jacobian(op):
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        call(op, mlp(3, 2), torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"f returned shape \(3, 1\) for a batch of 4"):
        call(op, lambda x: x[:3, :1], torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="unknown strategy 'sum_rev' for " + op):
        call(op, mlp(3, 2), torch.randn(4, 3), torch.randn(4, 3), strategy="sum_rev")


@pytest.mark.parametrize("where", ["module", "global"])
def test_a_hook_added_after_planning_is_followed(where):
    torch.manual_seed(0)
    model = mlp(3, 1, width=8).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert autojac.explain(model, x, op="laplacian").strategy == "jet_laplacian"
    double = lambda module, args, out: out * 2  # noqa: E731
    hook = (model[1].register_forward_hook(double) if where == "module"
            else nn.modules.module.register_module_forward_hook(double))
    try:
        expected = second_order_reference("laplacian", loop_hessian(model, x), (3,), None)
        assert_close(autojac.laplacian(model, x), expected)  # the engine runs the hook like any Python
        assert_close(autojac.laplacian(model, x, strategy="jet_laplacian"), expected)
    finally:
        hook.remove()
    assert_close(autojac.laplacian(model, x), second_order_reference("laplacian", loop_hessian(model, x), (3,), None))