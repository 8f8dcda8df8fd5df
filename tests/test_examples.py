"""The examples in examples/ run and do what they say."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.func import jacrev, vmap

from autojac import demo

from helpers import assert_close, loop_hessian, second_order_reference

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def one_thread():
    """The examples' training loops on one thread: on a shared 2-core machine two threads each
    wait for the other far more than they gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_poisson_pinn_trains_through_autojac_laplacians(one_thread):
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


def _parameter_grads(module, loss):
    return torch.autograd.grad(loss, list(module.parameters()))


def test_the_cnf_trains_with_autojac_divergence_and_tunes_once_for_every_ode_time(one_thread, capsys):
    pytest.importorskip("torchdiffeq", reason="the examples extra: pip install -e '.[examples]'")
    cnf = _load("cnf")
    run, seconds = cnf.main(["--quick"])  # 20 steps, B=128, RK4 with 2 steps: 8 evaluations per solve
    assert "1 plan(s) made" in capsys.readouterr().out
    # t reaches f through args: one plan for all 160 divergence calls, each at another time
    assert run.divergence_calls == 20 * 8 and len(run.plans_made) == 1
    assert [plan.batch_size for plan in cnf.autojac.plans(op="divergence")] == [128]
    assert set(seconds) == set(cnf.DIVERGENCES) and all(s > 0 for s in seconds.values())
    # the held-out negative log-likelihood fell
    held_out = cnf.two_moons(512, torch.Generator().manual_seed(7))
    untrained = cnf.train(steps=0, batch=128, solver_steps=2).flow
    with torch.no_grad():
        before = -untrained.log_density(held_out).mean()
        after = -run.flow.log_density(held_out).mean()
    assert after < before - 0.1


def test_the_cnf_divergences_agree_with_torch_func_and_train_alike(one_thread):
    pytest.importorskip("torchdiffeq", reason="the examples extra: pip install -e '.[examples]'")
    cnf = _load("cnf")
    torch.manual_seed(3)
    velocity = cnf.Velocity(width=16)
    z, t = torch.randn(32, 2), torch.tensor(0.3)
    jac = vmap(jacrev(lambda zi: velocity(zi[None], t)[0]))(z)  # (B, 2, 2)
    expected = jac.diagonal(dim1=1, dim2=2).sum(-1)
    flow = cnf.Flow(velocity)
    for name in ("autojac", "FFJORD brute force"):
        dz, div = cnf.DIVERGENCES[name](flow, z, t)
        assert_close(div.detach(), expected)
        assert_close(dz.detach(), velocity(z, t).detach())
    # the gradient of a whole solve's log-likelihood (8 calls: the plan's re-check at the 8th
    # included) equals the brute force's
    x = cnf.two_moons(64, torch.Generator().manual_seed(4))
    grads = {}
    for name in ("autojac", "FFJORD brute force"):
        solve = cnf.Flow(velocity, cnf.DIVERGENCES[name], solver_steps=2)
        grads[name] = _parameter_grads(velocity, -solve.log_density(x).mean())
    for a, b in zip(grads["autojac"], grads["FFJORD brute force"]):
        assert_close(a, b)
    # the hand-written Hutchinson estimate (the peer timed against) averages to the trace
    copies = 2000
    flow.probe = torch.randint(0, 2, (copies * 32, 2), generator=torch.Generator().manual_seed(6)).float() * 2 - 1
    _, estimates = cnf.divergence_hutchinson(flow, z.repeat(copies, 1), t)
    error = estimates.detach().view(copies, 32).mean(0) - expected
    assert error.abs().max() < 0.1 * expected.abs().max() + 0.02


def test_the_burgers_pinn_trains_through_autojac_derivatives(one_thread, capsys):
    burgers = _load("burgers_pinn")
    losses, seconds = burgers.main(["--quick"])  # 80 steps, 256 collocation points
    assert "time per training step" in capsys.readouterr().out
    assert losses[-1] < 0.5 * losses[0]
    assert set(seconds) == set(burgers.RESIDUALS) and all(s > 0 for s in seconds.values())


def test_the_burgers_residuals_agree_with_nested_autograd_and_train_alike(one_thread):
    burgers = _load("burgers_pinn")
    torch.manual_seed(5)
    model = burgers.make_model(width=16).double()
    xt = burgers.Points(64).inside.double()
    reference = burgers.residual_nested(model, xt)
    expected_grads = _parameter_grads(model, reference.square().mean())
    for name in ("autojac derivatives", "autojac dims={hessian_diag: [0]}"):
        residual = burgers.RESIDUALS[name](model, xt)
        assert_close(residual.detach(), reference.detach())
        for a, b in zip(_parameter_grads(model, residual.square().mean()), expected_grads):
            assert_close(a, b)
