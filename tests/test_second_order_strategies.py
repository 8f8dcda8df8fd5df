"""Every registered second-order strategy, at every chunk it offers, against per-sample references:
a loop of torch.autograd.functional.hessian, or closed forms where the function has them."""

import functools

import pytest
import torch
from torch import nn

from autojac.problem import Problem, Sizes
from autojac.strategies import for_op, get
from autojac.strategies.curvature import result_bytes

from helpers import MatrixOut, assert_close, centered, chunks_to_try, coupled_hessian, loop_hessian, mlp, \
    second_order_reference

OPS = ("hessian", "hvp", "hessian_diag", "laplacian")
ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softplus, nn.GELU, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Mish,
               nn.SELU, nn.CELU, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardswish, nn.ReLU6)
ENGINE = {"hessian": "jet_hessian", "hvp": "jet_hvp", "hessian_diag": "jet_laplacian", "laplacian": "jet_laplacian"}
STRATEGIES = [(op, s) for op in OPS for s in for_op(op)]


def _closed_form(second_derivative):
    """Hessian of x -> sum_i g(x_i): diagonal, with g'' on it."""
    return lambda x: torch.diag_embed(second_derivative(x))


CASES = {
    # name: (factory of f, per-sample input shape, exact Hessian or None for the loop reference)
    "tanh_mlp": (lambda: mlp(3, 2, width=8), (3,), None),
    "sin": (lambda: (lambda x: torch.sin(x).sum(-1)), (4,), _closed_form(lambda x: -torch.sin(x))),
    "cube": (lambda: (lambda x: (x ** 3).sum(-1)), (4,), _closed_form(lambda x: 6 * x)),
    "matrix_out": (MatrixOut, (6,), None),
    "scalar_softplus_mlp": (lambda: nn.Sequential(nn.Linear(2, 6), nn.Softplus(), nn.Linear(6, 1)), (2,), None),
    "matrix_in": (lambda: (lambda x: (torch.tanh(x) * x.flip(-1)).sum((-2, -1))), (2, 3), None),
}


@functools.lru_cache(maxsize=None)
def _case(name: str, dtype: torch.dtype):
    factory, in_shape, exact = CASES[name]
    torch.manual_seed(0)
    f = factory()
    if isinstance(f, nn.Module):
        f = f.to(dtype)
    x = torch.randn(3, *in_shape, dtype=dtype)
    v = torch.randn(3, *in_shape, dtype=dtype)
    hessian = exact(x) if exact is not None else loop_hessian(f, x)
    return f, x, v, hessian


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("op, strategy", STRATEGIES, ids=lambda s: getattr(s, "name", s))
def test_strategy_matches_the_reference(op, strategy, case, dtype):
    f, x, v, hessian = _case(case, dtype)
    problem = Problem(op, f, x, v if op == "hvp" else None)
    assert strategy.applies is None or strategy.applies(problem) == ""  # the engine follows every case
    expected = second_order_reference(op, hessian, problem.in_shape, v)
    out_numel = int(torch.Size(hessian.shape[1: hessian.dim() - 2 * len(problem.in_shape)]).numel())
    for chunk in chunks_to_try(strategy, problem.batch, problem.n, out_numel):
        result = strategy(problem, chunk)
        assert result.shape == expected.shape, (strategy.name, chunk)
        assert result.dtype == dtype and not result.requires_grad
        assert_close(result, expected)


@pytest.mark.parametrize("op, strategy", STRATEGIES, ids=lambda s: getattr(s, "name", s))
def test_second_derivatives_of_an_affine_function_are_zero(op, strategy):
    f = nn.Sequential(nn.Linear(3, 2)).double()
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    result = strategy(Problem(op, f, x, v if op == "hvp" else None))
    expected = second_order_reference(op, torch.zeros(4, 2, 3, 3, dtype=torch.float64), (3,), v)
    assert torch.equal(result, expected)


@pytest.mark.parametrize("op", OPS)
def test_the_coupled_strategies_are_exact_for_a_batch_coupled_function(op):
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    expected = second_order_reference(op, coupled_hessian(centered, x), (3,), v)
    coupled = [s for s in for_op(op) if s.coupled_only]
    assert coupled, f"no strategy serves {op} for batch-coupled f"
    for strategy in coupled:
        for chunk in (None, 5, 1):
            assert_close(strategy(Problem(op, centered, x, v if op == "hvp" else None), chunk), expected)
    # ...and the batch trick would get it wrong
    wrong = get("hvp_fwd_rev" if op == "hvp" else "sum_fwd_rev" if op == "hessian" else "fwd_fwd_diag")
    assert not torch.allclose(wrong(Problem(op, centered, x, v if op == "hvp" else None)), expected)


@pytest.mark.parametrize("activation", [
    *(cls() for cls in ACTIVATIONS), nn.GELU(approximate="tanh"), nn.Softplus(beta=2.0, threshold=1.0),
    nn.LeakyReLU(0.3), nn.ELU(alpha=0.7),
], ids=lambda m: repr(m))
def test_the_engine_knows_each_activations_derivatives(activation):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(3, 5), activation, nn.Sequential(nn.Linear(5, 5), activation), nn.Linear(5, 2))
    _check_forward_strategies(f.double())


def _check_forward_strategies(f: nn.Module) -> None:
    x, v = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    hessian = loop_hessian(f, x)
    for op in OPS:
        strategy = get(ENGINE[op], op)
        problem = Problem(op, f, x, v if op == "hvp" else None)
        assert strategy.applies(problem) == ""
        result = strategy(problem)
        assert_close(result, second_order_reference(op, hessian, (3,), v))


@pytest.mark.parametrize("factory", [
    lambda: nn.Sequential(nn.Tanh(), nn.Linear(3, 2)),  # J is still the identity at the first activation
    lambda: nn.Sequential(nn.SiLU()),  # no linear layer at all
    lambda: nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Sigmoid()),  # activations back to back
    lambda: _reusing(nn.Tanh(), nn.Linear(4, 4)),  # one activation and one hidden layer applied twice
    lambda: nn.Sequential(nn.Linear(3, 4), nn.SiLU(inplace=True), nn.Linear(4, 4), nn.ELU(inplace=True),
                          nn.Linear(4, 2), nn.LeakyReLU(0.5, inplace=True)),  # in-place activations
], ids=["activation_first", "activation_only", "two_activations", "shared_modules", "in_place"])
def test_the_engine_handles_any_order_of_layers(factory):
    _check_forward_strategies(factory().double())


def _reusing(activation: nn.Module, hidden: nn.Linear) -> nn.Sequential:
    # Sequential.forward runs a module as often as it is listed; children() lists it once
    return nn.Sequential(nn.Linear(3, 4), activation, hidden, activation, hidden, activation, nn.Linear(4, 2))


@pytest.mark.parametrize("f, reason", [
    (lambda: mlp(3, 2).train().append(nn.Dropout(0.1)), "dropout in training mode"),
    (lambda: (lambda x: torch.cumprod(x, 1)), "no rule for torch.cumprod"),
    (lambda: (lambda x: x.sin().cummax(1).values), "no rule for torch.Tensor.cummax"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "batch_norm in training mode"),
])
def test_the_engine_says_why_it_does_not_apply(f, reason):
    problem = Problem("laplacian", f(), torch.randn(2, 3))
    for name in ("jet_laplacian", "jet_hessian", "jet_hvp", "jet_jacobian_fwd", "jet_jacobian_rev", "jet_jacobian_meet"):
        assert reason in get(name).applies(problem), name


@pytest.mark.parametrize("f", [
    lambda: mlp(3, 2),
    lambda: (lambda net: lambda x: net(x).sin().sum(-1))(mlp(3, 2)),
    lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1)),
    lambda: MatrixOut(),
], ids=["sequential", "function", "layer_norm", "matrix_out"])
def test_the_engine_applies_to_modules_functions_and_normalizations(f):
    x = torch.randn(2, 6 if f().__class__ is MatrixOut else 3)
    assert get("jet_laplacian").applies(Problem("laplacian", f(), x)) == ""


def test_the_engine_follows_hooks_and_inputs_of_any_rank():
    model = mlp(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    handle = model[1].register_forward_hook(lambda module, args, out: out * 2)
    try:
        problem = Problem("hessian", model, x)
        assert get("jet_hessian").applies(problem) == ""
        assert_close(get("jet_hessian")(problem), loop_hessian(model, x))
    finally:
        handle.remove()
    matrix = lambda z: torch.tanh(z @ z.mT).flatten(1)  # noqa: E731  (x of shape (B, 2, 3))
    z = torch.randn(4, 2, 3, dtype=torch.float64)
    problem = Problem("hessian_diag", matrix, z)
    assert get("jet_laplacian").applies(problem) == ""
    assert_close(get("jet_laplacian")(problem), second_order_reference("hessian_diag", loop_hessian(matrix, z), (2, 3)))


@pytest.mark.parametrize("name, op", [("full_hessian", "hessian"), ("full_hvp", "hvp")])
def test_the_coupled_second_order_strategies_offer_only_short_spans(name, op):
    # The second level runs through every lane of its span's vectorized first level: a span of
    # the whole basis (B*m = 512 here) costs its square, so it is never offered...
    strategy = get(name, op)
    large = Sizes(batch=512, n=64, m=1, itemsize=4, activations=512 * 64 * 4 * 4)
    assert strategy.chunk_options(large) == (4, 2, 1)
    assert strategy.memory(large, 4) < 2**30
    # ...unless a short span holds it all anyway
    assert strategy.chunk_options(Sizes(batch=2, n=3, m=1, itemsize=4, activations=0)) == (None, 1)


def test_every_strategy_estimates_at_least_its_result():
    sizes = Sizes(batch=8, n=10, m=3, itemsize=4, activations=1000)
    for op, strategy in STRATEGIES:
        for chunk in strategy.chunk_options(sizes):
            assert strategy.memory(sizes, chunk) >= result_bytes(sizes, op), (strategy.name, chunk)


def test_reverse_over_reverse_is_estimated_with_its_inner_lanes_and_left_out_when_too_big():
    # vmap(jacrev(jacrev(f))) on a wide output: each of the m n outer seeds runs through the
    # inner backward pass's m lanes. Unchunked on 8 -> 256 -> 784 at B=1 it took over 24 GB (the
    # benchmark process was killed) while its estimate, counting outer seeds only, said 125 MB.
    from autojac.planner import candidates
    from autojac.probes import run_probes
    from autojac.problem import Sizes

    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.Tanh(), torch.nn.Linear(256, 784), torch.nn.Sigmoid())
    x = torch.randn(1, 8)
    probes = run_probes(f, x)
    sizes = Sizes(batch=1, n=8, m=784, itemsize=4, activations=probes.activations)
    strategy = get("vmap_rev_rev", "hessian")
    assert strategy.memory(sizes, None) > 24 * 2**30
    assert strategy.memory(sizes, 16) < strategy.memory(sizes, None) / 100
    valid, excluded = candidates("hessian", sizes, probes, create_graph=False, budget=11 * 2**30)
    assert "over the memory budget" in excluded["vmap_rev_rev"]
    assert "vmap_rev_rev[chunk=16]" in {c.label for c in valid}
