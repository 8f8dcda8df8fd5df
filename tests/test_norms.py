"""Normalizations run as plain operations where a result keeps its graph (norms.py): the same
values and running statistics as PyTorch's fused kernels, and parameter gradients of second-order
results that agree with float64 finite differences (where the fused kernels' do not)."""

import copy

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import autojac
from autojac.norms import ExactNorms, fused_norm
from helpers import directional_fd

D = torch.float64


def _norms():
    return {
        "layer": (nn.LayerNorm(6), (5, 6)),
        "group": (nn.GroupNorm(2, 6), (5, 6, 3)),
        "batch-train": (nn.BatchNorm1d(6), (5, 6)),
        "batch-eval": (nn.BatchNorm1d(6).eval(), (5, 6)),
        "batch-cumulative": (nn.BatchNorm1d(6, momentum=None), (5, 6)),
        "instance-tracked": (nn.InstanceNorm1d(6, affine=True, track_running_stats=True), (5, 6, 4)),
        "instance": (nn.InstanceNorm1d(6), (5, 6, 4)),
    }


@pytest.mark.parametrize("name", list(_norms()))
def test_the_plain_forms_give_the_fused_kernels_values_and_running_statistics(name):
    torch.manual_seed(0)
    module, shape = _norms()[name]
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
        if getattr(module, "running_var", None) is not None:
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-1.0, 1.0)
    twin = copy.deepcopy(module)
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    fused = module(x)
    assert fused_norm(fused).startswith("Native")
    with ExactNorms():
        plain = twin(x)
    assert fused_norm(plain) == ""
    torch.testing.assert_close(plain, fused, rtol=1e-10, atol=1e-12)
    for a, b in zip(module.buffers(), twin.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["layer", "group"])
@pytest.mark.parametrize("strategy", ["grad_grad_diag", "hvp_diag", "auto"])
def test_training_through_a_laplacian_of_a_normalized_model_has_right_gradients(norm, strategy):
    torch.manual_seed(0)
    layer = nn.LayerNorm(6) if norm == "layer" else nn.GroupNorm(2, 6)
    net = nn.Sequential(nn.Linear(4, 6), layer, nn.Tanh(), nn.Linear(6, 1)).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x, weights = torch.randn(6, 4, dtype=D), torch.randn(6, 1, dtype=D)
    params = list(net.parameters())[:-1]
    directions = [torch.randn_like(p) for p in params]

    def reference():  # reverse over reverse: second order only, which PyTorch gets right
        hessian = vmap(jacrev(jacrev(lambda xi: net(xi[None])[0])))(x)  # (B, 1, 4, 4)
        return (weights * hessian.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()

    expected = directional_fd(params, directions, reference)
    lap = autojac.laplacian(net, x, create_graph=True, strategy=strategy, tune=False)
    gradients = torch.autograd.grad((weights * lap).sum(), params)
    got = sum((g * d).sum() for g, d in zip(gradients, directions)).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("op,strategy", [("hessian_diag", "grad_grad_diag"), ("hessian_diag", "full_hessian"),
                                         ("hessian_diag", "hvp_diag"), ("hvp", "full_hvp"), ("hvp", "hvp_rev_rev")])
def test_second_order_strategies_work_on_group_norm_without_create_graph(op, strategy):
    # PyTorch's batched double backward of group_norm fails on a reshape, and its backward has no
    # forward-mode derivative: the strategies run it as plain operations. Reference: central
    # differences of per-sample Jacobians (PyTorch's first derivatives are right).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.GroupNorm(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    x, v = torch.rand(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    jac = vmap(jacrev(lambda xi: net(xi[None])[0]))
    eps = 1e-5
    columns = [(jac(x + eps * e) - jac(x - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=D)]
    hessian = torch.stack(columns, -1)  # (B, out, in, in)
    expected = (torch.diagonal(hessian, dim1=-2, dim2=-1) if op == "hessian_diag"
                else torch.einsum("bkij,bj->bki", hessian, v))
    got = autojac.hessian_diag(net, x, strategy=strategy) if op == "hessian_diag" else \
        autojac.hvp(net, x, v, strategy=strategy)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
