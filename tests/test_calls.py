"""What torch.func, PINN and flow users reach for: extra arguments, several inputs, has_aux,
derivatives over chosen coordinates, several derivatives at once, the divergence. Every form is
compared with an independent reference (torch.func with argnums/in_dims, per-sample loops)."""

import functools

import pytest
import torch
from torch import nn
from torch.func import hessian as func_hessian, jacrev, vmap

import autojac
from autojac import trust, tuner
from autojac.strategies import registry

from helpers import assert_close, centered, diagonal_blocks, loop_hessian, loop_jacobian, mlp

torch.set_default_dtype(torch.float32)


def per_sample(f, x, *args, in_dims=None):
    """vmap(jacrev) of f(x, *args) with per-sample args (in_dims as torch.vmap)."""
    dims = in_dims or (0,) * (1 + len(args))

    def one(xi, *a):
        batched = [ai if d is None else ai.unsqueeze(0) for ai, d in zip(a, dims[1:])]
        return f(xi.unsqueeze(0), *batched).squeeze(0)

    return vmap(jacrev(one), in_dims=dims)(x, *args)


def per_sample_hessian(f, x, *args, in_dims=None):
    dims = in_dims or (0,) * (1 + len(args))

    def one(xi, *a):
        batched = [ai if d is None else ai.unsqueeze(0) for ai, d in zip(a, dims[1:])]
        return f(xi.unsqueeze(0), *batched).squeeze(0)

    return vmap(func_hessian(one), in_dims=dims)(x, *args)


class Conditioned(nn.Module):
    """f(x, cond): a per-sample condition and a shared scale."""

    def __init__(self):
        super().__init__()
        self.net = mlp(5, 3)

    def forward(self, x, cond, scale):
        return self.net(x * cond) * scale


def grads(module):
    """Each parameter's gradient, zeros where backward did not reach it (an output bias in a
    derivative), then cleared for the reference's backward pass."""
    found = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return found


def tuning_count(monkeypatch):
    counted = []
    real = tuner.choose
    from autojac import planner

    def counting(*a, **k):
        if k.get("tune"):
            counted.append(1)
        return real(*a, **k)

    monkeypatch.setattr(planner, "choose", counting)
    return counted


# -- args and in_dims ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["auto", "sum_rev", "sum_grad", "sum_fwd", "vmap_rev", "vmap_fwd", "loop_rev"])
def test_extra_arguments_per_sample_and_shared_match_vmap_jacrev(strategy):
    model, x = Conditioned(), torch.randn(6, 5)
    cond, scale = torch.randn(6, 5), torch.randn(3)  # cond per sample (first dim B), scale shared
    result = autojac.jacobian(model, x, args=(cond, scale), strategy=strategy)
    assert_close(result, per_sample(model, x, cond, scale, in_dims=(0, 0, None)))


def test_in_dims_overrides_the_default_for_an_argument_whose_first_dimension_happens_to_be_b():
    f = lambda x, w: x @ w  # noqa: E731 - w (5, 5) is shared although its first dimension is B
    x, w = torch.randn(5, 5), torch.randn(5, 5)
    expected = w.t().expand(5, 5, 5)
    assert_close(autojac.jacobian(f, x, args=(w,), in_dims=(0, None)), expected)
    scaled = lambda x, c: x * c  # noqa: E731 - the default: c[b] goes with sample b
    assert_close(autojac.jacobian(scaled, x, args=(w,), strategy="vmap_rev"), torch.diag_embed(w))


def test_in_dims_other_than_zero_slice_that_dimension():
    f = lambda x, c: x * c.t()  # noqa: E731 - c is (5, B): batch on its dimension 1
    x, c = torch.randn(4, 5), torch.randn(5, 4)
    expected = torch.diag_embed(c.t())
    for strategy in ("vmap_rev", "sum_grad"):
        assert_close(autojac.jacobian(f, x, args=(c,), in_dims=(0, 1), strategy=strategy), expected)


def test_a_float_argument_such_as_an_ode_time_never_retunes(monkeypatch):
    counted = tuning_count(monkeypatch)
    net = mlp(4, 4)
    dyn = lambda z, t: net(z) * torch.cos(torch.as_tensor(t))  # noqa: E731
    z = torch.randn(8, 4)
    for t in (0.0, 0.1, 0.25, 0.5, 1.0):
        result = autojac.jacobian(dyn, z, args=(t,))
        assert_close(result, loop_jacobian(lambda zz: dyn(zz, t), z))
    assert len(counted) == 1


@pytest.mark.parametrize("in_dims, message", [
    ((0,), "one entry for x and each of the 1 extra arguments"),
    ((1, 0), r"in_dims\[0\] is 1"),
    ((0, 0.5), r"in_dims\[1\] must be an int or None"),
    ((0, 1), r"args\[0\] has shape \(6, 5\): its dimension 1 must be the batch size 6"),
])
def test_bad_in_dims_are_refused_naming_the_argument(in_dims, message):
    with pytest.raises((ValueError, TypeError), match=message):
        autojac.jacobian(lambda x, c: x * c, torch.randn(6, 5), args=(torch.randn(6, 5),), in_dims=in_dims)


def test_args_must_be_a_tuple():
    with pytest.raises(TypeError, match="args must be a tuple"):
        autojac.jacobian(lambda x, c: x * c, torch.randn(6, 5), args=torch.randn(6, 5))


# -- several inputs -----------------------------------------------------------------------------

def test_a_tuple_of_inputs_gives_one_jacobian_per_input_like_autograd_functional():
    net = mlp(3, 2)
    f = lambda x, t: net(torch.cat([x, t.unsqueeze(1)], 1))  # noqa: E731 - t of shape (B,)
    x, t = torch.randn(5, 2), torch.randn(5)
    jx, jt = autojac.jacobian(f, (x, t))
    assert jx.shape == (5, 2, 2) and jt.shape == (5, 2)
    full_x, full_t = torch.autograd.functional.jacobian(f, (x, t))  # (B, 2, B, 2), (B, 2, B)
    index = torch.arange(5)
    assert_close(jx, full_x[index, :, index])
    assert_close(jt, full_t[index, :, index])


def test_several_inputs_with_create_graph_train_like_the_reference():
    net = mlp(3, 1)
    f = lambda x, t: net(torch.cat([x, t], 1)).squeeze(-1)  # noqa: E731
    x, t = torch.randn(4, 2), torch.randn(4, 1)
    jx, jt = autojac.jacobian(f, (x, t), create_graph=True)
    (jx.square().sum() + jt.sum()).backward()
    got = grads(net)
    rx, rt = vmap(jacrev(lambda a, b: f(a[None], b[None])[0], argnums=(0, 1)))(x, t)
    (rx.square().sum() + rt.sum()).backward()
    for a, b in zip(got, grads(net)):
        assert_close(a, b)


def test_several_inputs_only_for_the_jacobian():
    with pytest.raises(TypeError, match="only autojac.jacobian takes"):
        autojac.laplacian(lambda x, t: x.sum(1) * t.sum(1), (torch.randn(3, 2), torch.randn(3, 1)))
    with pytest.raises(ValueError, match=r"x\[1\] has batch size 4 but x\[0\] has 3"):
        autojac.jacobian(lambda x, t: x * t, (torch.randn(3, 2), torch.randn(4, 2)))


# -- has_aux ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["auto", "sum_grad", "sum_rev", "vmap_rev", "sum_fwd"])
def test_has_aux_returns_the_aux_of_the_forward_pass(strategy):
    net = mlp(4, 2)

    def f(x):
        y = net(x)
        return y, {"norm": y.norm(dim=1), "tag": "ok"}

    x = torch.randn(5, 4)
    jac, aux = autojac.jacobian(f, x, has_aux=True, strategy=strategy)
    assert_close(jac, loop_jacobian(net, x))
    assert aux["tag"] == "ok" and not aux["norm"].requires_grad
    assert_close(aux["norm"], net(x).norm(dim=1).detach())


def test_has_aux_with_create_graph_keeps_the_aux_differentiable():
    net = mlp(3, 1)
    x = torch.randn(4, 3, requires_grad=True)
    lap, aux = autojac.laplacian(lambda z: (net(z), net(z).sum()), x, has_aux=True, create_graph=True)
    assert aux.requires_grad
    (grad,) = torch.autograd.grad(aux, x)
    assert_close(grad, loop_jacobian(net, x).sum(1))


def test_has_aux_needs_a_pair():
    with pytest.raises(TypeError, match=r"has_aux=True: f must return a pair \(output, aux\)"):
        autojac.jacobian(lambda x: x * 2, torch.randn(3, 2), has_aux=True)


# -- dims ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["jacobian", "hessian_diag", "laplacian", "hessian"])
def test_dims_restrict_to_the_chosen_coordinates(op):
    net = mlp(3, 1, width=8).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    dims = [0, 2]
    result = getattr(autojac, op)(net, x, dims=dims)
    if op == "jacobian":
        expected = loop_jacobian(net, x)[..., dims]
    else:
        hess = loop_hessian(net, x)[..., dims, :][..., dims]  # (B, 1, 2, 2)
        diag = hess.diagonal(dim1=-2, dim2=-1)
        expected = {"hessian": hess, "hessian_diag": diag, "laplacian": diag.sum(-1)}[op]
    assert_close(result, expected)


def test_hvp_with_dims_takes_a_direction_in_the_chosen_coordinates():
    net = mlp(3, 2, width=8).double()
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    hess = loop_hessian(net, x)[..., [1, 2], :][..., [1, 2]]  # (B, 2, 2, 2)
    assert_close(autojac.hvp(net, x, v, dims=[1, 2]), (hess @ v[:, None, :, None]).squeeze(-1))
    with pytest.raises(ValueError, match=r"with dims, v is one direction per sample in the chosen coordinates"):
        autojac.hvp(net, x, torch.randn(4, 3, dtype=torch.float64), dims=[1, 2])


def test_the_spatial_laplacian_of_a_space_time_network_trains_like_nested_autograd():
    net = mlp(3, 1, width=8)
    xyt = torch.rand(6, 3)
    lap = autojac.laplacian(net, xyt, dims=[0, 1], create_graph=True)
    lap.square().sum().backward()
    got = grads(net)
    z = xyt.clone().requires_grad_()
    (g,) = torch.autograd.grad(net(z).sum(), z, create_graph=True)
    reference = sum(torch.autograd.grad(g[:, i].sum(), z, create_graph=True)[0][:, i] for i in (0, 1))
    reference.square().sum().backward()
    assert_close(lap.detach().squeeze(-1), reference.detach())
    for a, b in zip(got, grads(net)):
        assert_close(a, b)


@pytest.mark.parametrize("dims, message", [([], "non-empty"), ([0, 3], r"out of range"), ([1, 1], "repeat"),
                                           ([0.5], "int indices")])
def test_bad_dims_are_refused(dims, message):
    with pytest.raises((ValueError, TypeError), match=message):
        autojac.laplacian(mlp(3, 1), torch.randn(4, 3), dims=dims)


# -- derivatives ----------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["auto", "nested_derivatives", "vmap_derivatives", "jet_derivatives"])
@pytest.mark.parametrize("ops", [("value", "jacobian", "laplacian"), ("jacobian", "hessian_diag"), ("hessian",),
                                 ("value",), ("laplacian", "hessian", "value")])
def test_derivatives_match_the_separate_references(ops, strategy):
    net = mlp(3, 2, width=8).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    found = autojac.derivatives(net, x, ops=ops, strategy=strategy)
    hess = loop_hessian(net, x)
    diag = hess.diagonal(dim1=-2, dim2=-1)
    expected = {"value": net(x), "jacobian": loop_jacobian(net, x), "hessian": hess, "hessian_diag": diag,
                "laplacian": diag.sum(-1)}
    for name in ("value", "jacobian", "hessian_diag", "laplacian", "hessian"):
        got = getattr(found, name)
        if name in ops:
            assert_close(got, expected[name].detach())
        else:
            assert got is None


@pytest.mark.parametrize("strategy", ["auto", "nested_derivatives", "jet_derivatives"])
def test_derivatives_with_create_graph_train_like_the_reference(strategy):
    net = mlp(2, 1, width=8)
    x = torch.rand(8, 2)
    found = autojac.derivatives(net, x, ops=("value", "laplacian"), create_graph=True, strategy=strategy)
    (found.laplacian - found.value).square().mean().backward()
    got = grads(net)
    lap = loop_hessian(net, x, create_graph=True).diagonal(dim1=-2, dim2=-1).sum(-1)
    (lap - net(x)).square().mean().backward()
    for a, b in zip(got, grads(net)):
        assert_close(a, b)


def test_derivatives_have_one_plan_for_the_set():
    net, x = mlp(3, 1), torch.randn(4, 3)
    plan = autojac.explain(net, x, op="derivatives", ops=("value", "laplacian"))
    other = autojac.explain(net, x, op="derivatives", ops=("jacobian",))
    assert plan.op == "derivatives" and "ops=value,laplacian" in plan.call and plan.key != other.key


def test_derivatives_refuse_unknown_quantities():
    with pytest.raises(ValueError, match="ops must name some of value, jacobian"):
        autojac.derivatives(mlp(3, 1), torch.randn(2, 3), ops=("gradient",))


# -- divergence -----------------------------------------------------------------------------------

def field():
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()


@pytest.mark.parametrize("strategy", ["auto", "div_rows", "div_loop", "div_fwd", "jet_divergence"])
def test_divergence_is_the_trace_of_each_jacobian(strategy):
    f, x = field(), torch.randn(6, 3, dtype=torch.float64)
    expected = loop_jacobian(f, x).diagonal(dim1=1, dim2=2).sum(-1)
    assert_close(autojac.divergence(f, x, strategy=strategy), expected)


def test_divergence_of_a_batch_coupled_field_is_exact():
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = diagonal_blocks(centered, x).diagonal(dim1=1, dim2=2).sum(-1)
    assert_close(autojac.divergence(centered, x), expected)
    assert autojac.explain(centered, x, op="divergence").strategy == "full_divergence"


def test_divergence_needs_a_square_jacobian():
    with pytest.raises(ValueError, match=r"per-sample output shape to equal its input's"):
        autojac.divergence(mlp(3, 2), torch.randn(4, 3))


def test_hutchinson_is_reproducible_unbiased_and_differentiable():
    f, x = field(), torch.randn(4, 3, dtype=torch.float64)
    exact = autojac.divergence(f, x)
    one = autojac.divergence(f, x, estimator="hutchinson", samples=3, generator=torch.Generator().manual_seed(1))
    two = autojac.divergence(f, x, estimator="hutchinson", samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(one, two)
    many = autojac.divergence(f, x, estimator="hutchinson", samples=20000, generator=torch.Generator().manual_seed(2))
    assert (many - exact).abs().max() < 0.05 * exact.abs().max() + 0.05
    # differentiable: the estimate's gradient is that of eps^T J eps with the same probes
    xg = x.clone().requires_grad_()
    estimate = autojac.divergence(f, xg, estimator="hutchinson", samples=2, create_graph=True,
                                  generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(estimate.sum(), xg)
    signs = torch.randint(0, 2, (2, 4, 3), generator=torch.Generator().manual_seed(3)).double() * 2 - 1
    z = x.clone().requires_grad_()
    y = f(z)
    by_hand = sum((torch.autograd.grad(y, z, e, create_graph=True)[0] * e).sum(-1) for e in signs) / 2
    (expected,) = torch.autograd.grad(by_hand.sum(), z)
    assert_close(estimate.detach(), by_hand.detach())
    assert_close(grad, expected)


def test_hutchinson_is_never_chosen_for_you():
    assert all(not name.startswith("hutch") for name in registry.names("divergence"))
    with pytest.raises(ValueError, match="estimator must be 'exact' or 'hutchinson'"):
        autojac.divergence(field(), torch.randn(2, 3, dtype=torch.float64), estimator="stochastic")


def test_partial_with_a_float_time_shares_one_plan(monkeypatch):
    counted = tuning_count(monkeypatch)
    net = field()
    dyn = lambda t, z: net(z) * (1 + t)  # noqa: E731
    z = torch.randn(6, 3, dtype=torch.float64)
    for t in (0.0, 0.5, 1.5):
        assert_close(autojac.divergence(functools.partial(dyn, t), z),
                     (1 + t) * loop_jacobian(net, z).diagonal(dim1=1, dim2=2).sum(-1))
    assert len(counted) == 1



@pytest.mark.parametrize("form", ["args", "has_aux", "dims", "inputs", "derivatives"])
def test_calls_with_extras_are_served_by_the_hot_path_after_the_first(monkeypatch, form):
    from autojac import api

    net = field()
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)

    def scaled(z, s):
        return net(z) * s

    def with_aux(z, s):
        y = net(z) * s
        return y, y

    def two(a, b):
        return net(a + b)

    call = {
        "args": lambda: autojac.divergence(scaled, x, args=(t,)),
        "has_aux": lambda: autojac.divergence(with_aux, x, args=(t,), has_aux=True)[0],
        "dims": lambda: autojac.laplacian(net, x, dims=[0, 2]),
        "inputs": lambda: autojac.jacobian(two, (x, x))[1],
        "derivatives": lambda: autojac.derivatives(net, x, ops=("value", "laplacian")).laplacian,
    }[form]
    slow = []
    real = api._slow
    monkeypatch.setattr(api, "_slow", lambda *a, **k: slow.append(1) or real(*a, **k))
    first = call()
    for _ in range(4):
        assert_close(call(), first)
    assert len(slow) == 1  # the later calls are served: no signature, no fingerprint, no lookup by key


def test_the_aux_of_every_served_call_comes_from_the_callers_x_with_create_graph():
    # the batch-independence re-checks at calls 16, 32, ... run f too: their forward pass must not
    # stand in for the answer's (its aux would hang off a copy of x, cut from the caller's graph)
    net = field()

    def with_aux(z, s):
        y = net(z) * s
        return y, y

    t = torch.tensor(0.5, dtype=torch.float64)
    for call in range(trust.FIRST_CHECK + 1):  # the first scheduled check included
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        _, aux = autojac.divergence(with_aux, x * 1.0, args=(t,), has_aux=True, create_graph=True)
        (grad,) = torch.autograd.grad(aux.sum(), x)
        assert_close(grad, loop_jacobian(net, x).sum(1) * 0.5), f"call {call + 1}"


def test_a_call_with_extras_tunes_once_tuning_is_switched_back_on(monkeypatch):
    net = field()

    def scaled(z, s):
        return net(z) * s

    x, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    monkeypatch.setenv("AUTOJAC_TUNE", "0")
    autojac.divergence(scaled, x, args=(t,))
    autojac.divergence(scaled, x, args=(t,))
    counted = tuning_count(monkeypatch)
    monkeypatch.delenv("AUTOJAC_TUNE")
    autojac.divergence(scaled, x, args=(t,))
    assert len(counted) == 1
    assert autojac.explain(scaled, x, op="divergence", args=(t,), tune=False).tuned


@pytest.mark.parametrize("strategy", ["auto", "nested_derivatives", "vmap_derivatives", "jet_derivatives"])
@pytest.mark.parametrize("ops", [("value", "jacobian", "hessian_diag"), ("jacobian", "laplacian"), ("hessian",),
                                 ("value", "hessian", "laplacian")])
def test_derivatives_with_dims_per_quantity(ops, strategy):
    # a PINN's residual: u_x and u_t from the Jacobian over (x, t), u_xx alone of the second order
    net = mlp(3, 2, width=8).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    found = autojac.derivatives(net, x, ops=ops, dims={"hessian_diag": [2, 0], "laplacian": [2, 0],
                                                       "hessian": [2, 0]}, strategy=strategy)
    hess = loop_hessian(net, x)[..., [2, 0], :][..., [2, 0]]  # (B, 2, 2, 2)
    expected = {"value": net(x).detach(), "jacobian": loop_jacobian(net, x), "hessian": hess,
                "hessian_diag": hess.diagonal(dim1=-2, dim2=-1), "laplacian": hess.diagonal(dim1=-2, dim2=-1).sum(-1)}
    for name in ops:
        assert_close(getattr(found, name), expected[name])


def test_dims_per_quantity_cut_the_jacobian_too_and_refuse_what_cannot_share_a_pass():
    net = mlp(3, 1, width=8).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    found = autojac.derivatives(net, x, ops=("jacobian", "hessian_diag"), dims={"jacobian": [1], "hessian_diag": [0]})
    assert_close(found.jacobian, loop_jacobian(net, x)[..., [1]])
    assert_close(found.hessian_diag, loop_hessian(net, x)[..., [0], :][..., [0]].diagonal(dim1=-2, dim2=-1))
    with pytest.raises(ValueError, match="different coordinates"):
        autojac.derivatives(net, x, ops=("hessian_diag", "laplacian"), dims={"hessian_diag": [0], "laplacian": [1]})
    with pytest.raises(ValueError, match="dims names"):
        autojac.derivatives(net, x, ops=("laplacian",), dims={"lap": [0]})
    with pytest.raises(TypeError, match="only for autojac.derivatives"):
        autojac.laplacian(net, x, dims={"laplacian": [0]})


def test_a_pinn_residual_with_dims_per_quantity_trains_like_nested_autograd():
    net = mlp(2, 1, width=8)
    xt = torch.rand(16, 2)
    d = autojac.derivatives(net, xt, ops=("value", "jacobian", "hessian_diag"), dims={"hessian_diag": [0]},
                            create_graph=True)
    residual = d.jacobian[:, 0, 1] + d.value[:, 0] * d.jacobian[:, 0, 0] - 0.01 * d.hessian_diag[:, 0, 0]
    residual.square().mean().backward()
    got = grads(net)
    z = xt.clone().requires_grad_()
    u = net(z)
    (g,) = torch.autograd.grad(u.sum(), z, create_graph=True)
    (gg,) = torch.autograd.grad(g[:, 0].sum(), z, create_graph=True)
    reference = g[:, 1] + u[:, 0] * g[:, 0] - 0.01 * gg[:, 0]
    reference.square().mean().backward()
    assert_close(residual.detach(), reference.detach())
    for a, b in zip(got, grads(net)):
        assert_close(a, b)
