"""Every registered Jacobian strategy, at every chunk it offers, against a per-sample loop."""

import pytest
import torch

from autojac.problem import Problem, Sizes
from autojac.strategies import for_op
from autojac.strategies.registry import BATCH_INDEPENDENT, VMAP, Strategy, get, register, temporary

from helpers import MatrixOut, ScalarOut, SmallConv, assert_close, centered, chunks_to_try, data_dependent, \
    diagonal_blocks, loop_jacobian, mlp

JACOBIAN_STRATEGIES = for_op("jacobian")

CASES = {
    "mlp": (lambda: mlp(5, 3), (5,)),
    "conv": (SmallConv, (1, 8, 8)),
    "scalar_out": (ScalarOut, (4,)),
    "matrix_out": (MatrixOut, (6,)),
    "elementwise_matrix_in": (lambda: (lambda x: torch.sin(x) * x.sum((1, 2), keepdim=True)), (2, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strategy", JACOBIAN_STRATEGIES, ids=lambda s: s.name)
def test_strategy_matches_loop_reference(strategy, case, dtype):
    factory, in_shape = CASES[case]
    f = factory()
    if isinstance(f, torch.nn.Module):
        f = f.to(dtype)
    x = torch.randn(3, *in_shape, dtype=dtype)
    expected = loop_jacobian(f, x)
    out_numel = int(torch.Size(expected.shape[1:expected.dim() - len(in_shape)]).numel())
    for chunk in chunks_to_try(strategy, 3, int(torch.Size(in_shape).numel()), out_numel):
        result = strategy(Problem("jacobian", f, x), chunk)
        assert result.shape == expected.shape, (strategy.name, chunk)
        assert result.dtype == dtype and not result.requires_grad
        assert_close(result, expected)


@pytest.mark.parametrize("chunk", [None, 5, 1])
def test_full_diag_is_exact_for_a_coupled_function(chunk):
    x = torch.randn(4, 3, dtype=torch.float64)
    result = get("full_diag")(Problem("jacobian", centered, x), chunk)
    assert_close(result, diagonal_blocks(centered, x))
    # ...and differs from what a batch-independent strategy would claim
    assert not torch.allclose(get("sum_rev")(Problem("jacobian", centered, x)), result)


@pytest.mark.parametrize("strategy", [s for s in JACOBIAN_STRATEGIES if VMAP not in s.needs], ids=lambda s: s.name)
def test_strategies_without_vmap_handle_data_dependent_control_flow(strategy):
    x = torch.randn(3, 4, dtype=torch.float64)
    try:
        result = strategy(Problem("jacobian", data_dependent, x))
    except RuntimeError as error:  # only vectorized backward may refuse; the loops must not
        assert strategy.name not in ("loop_rev", "full_diag"), error
        return
    assert_close(result, loop_jacobian(data_dependent, x))


def test_full_diag_never_builds_the_whole_identity():
    # B*m = 512*64 rows: the (B*m, B*m) identity alone would be 4 GiB in float32.
    sizes = Sizes(batch=512, n=64, m=64, itemsize=4, activations=512 * 64 * 4 * 4)
    estimate = get("full_diag").memory(sizes, 64)
    assert estimate < 2**30
    assert get("full_diag").memory(sizes, None) > 4 * 2**30


def test_every_strategy_declares_known_needs_and_a_memory_estimate():
    sizes = Sizes(batch=8, n=10, m=3, itemsize=4, activations=1000)
    for strategy in JACOBIAN_STRATEGIES:
        assert strategy.needs <= {BATCH_INDEPENDENT, VMAP}
        for chunk in strategy.chunk_options(sizes):
            assert strategy.memory(sizes, chunk) >= sizes.tensor(8, 3, 10)  # at least the result


def test_registry_refuses_duplicates_and_lists_known_names():
    with pytest.raises(ValueError, match="already registered"):
        register(get("sum_rev"))
    with pytest.raises(ValueError, match=r"unknown strategy 'sum-rev' for jacobian; known: full_diag, jet_jacobian_fwd, jet_jacobian_meet, "
                                         r"jet_jacobian_rev, loop_rev"):
        get("sum-rev", "jacobian")
    with pytest.raises(ValueError, match="needs unknown"):
        Strategy(name="x", ops=frozenset({"jacobian"}), run=None, memory=None, needs=frozenset({"magic"}))


def test_temporary_registration_is_removed():
    with temporary() as reg:
        reg.add(Strategy(name="fake_for_test", ops=frozenset({"jacobian"}), run=lambda p, c: p.x,
                         memory=lambda s, c: 0))
        assert get("fake_for_test").name == "fake_for_test"
    with pytest.raises(ValueError):
        get("fake_for_test")


def test_results_are_detached_even_when_x_requires_grad():
    x = torch.randn(3, 5, requires_grad=True)
    f = mlp(5, 3)
    for strategy in JACOBIAN_STRATEGIES:
        result = strategy(Problem("jacobian", f, x))
        assert not result.requires_grad, strategy.name
    assert x.grad is None and all(p.grad is None for p in f.parameters())


@pytest.mark.parametrize("op", ["jacobian", "hessian", "hvp", "hessian_diag", "laplacian"])
def test_results_have_xs_dtype_when_f_computes_in_another(op):
    # f casts its float64 input to float32: forward mode would hand back float32 tangents
    linear = torch.nn.Linear(4, 3)
    f = lambda x: torch.tanh(linear(x.float()))  # noqa: E731
    x = torch.randn(2, 4, dtype=torch.float64)
    v = torch.randn_like(x) if op == "hvp" else None
    for strategy in for_op(op):
        if strategy.applies is not None and strategy.applies(Problem(op, f, x, v)):
            continue
        result = strategy(Problem(op, f, x, v))
        assert result.dtype == torch.float64, strategy.name
