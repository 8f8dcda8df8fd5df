"""Review 4: real models run against independent references (torch.func, per-sample loops); each
test is a wrong answer or crash the review found."""

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

import autojac

from helpers import assert_close


class NormNet(nn.Module):
    """(B, 3) -> (B, 2): Linear, LayerNorm, tanh, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln, self.c = nn.Linear(3, 16), nn.LayerNorm(16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.ln(self.a(x))))


def per_sample_hessian(f, x):
    return vmap(hessian(lambda xi: f(xi[None])[0]))(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reverse_over_forward_hvp_of_layer_norm(dtype):
    # PyTorch's reverse-mode derivative of layer_norm's jvp is wrong: hvp_rev_fwd returned it
    torch.manual_seed(0)
    f = NormNet().to(dtype)
    x, v = torch.randn(4, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    expected = torch.einsum("bkij,bj->bki", per_sample_hessian(f, x), v)
    assert_close(autojac.hvp(f, x, v, strategy="hvp_rev_fwd"), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_over_forward_diagonal_of_layer_norm(dtype):
    # and its forward-mode derivative of layer_norm's jvp too: fwd_fwd_diag returned it
    torch.manual_seed(0)
    f = NormNet().to(dtype)
    x = torch.randn(4, 3, dtype=dtype)
    expected = per_sample_hessian(f, x).diagonal(dim1=-2, dim2=-1)
    assert_close(autojac.hessian_diag(f, x, strategy="fwd_fwd_diag"), expected)
    assert_close(autojac.laplacian(f, x, strategy="fwd_fwd_diag"), expected.sum(-1))


def per_sample_jacobian(f, x, *args):
    return vmap(jacrev(lambda xi, *a: f(xi[None], *(t[None] for t in a))[0]))(x, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meet_in_the_middle_with_dims_and_per_sample_args(dtype):
    # the engine found f's cuts on two samples only: f bound to the whole batch's x (dims) or
    # per-sample args failed there, and jet_jacobian_meet was refused with an internal error
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, t = torch.rand(5, 3, dtype=dtype), torch.rand(5, 1, dtype=dtype)
    full = per_sample_jacobian(net, torch.cat([x, t], -1))
    assert_close(autojac.jacobian(net, torch.cat([x, t], -1), dims=[2, 0], strategy="jet_jacobian_meet"),
                 full[..., [2, 0]])

    def f(x, t):
        return net(torch.cat([x, t], -1))

    assert_close(autojac.jacobian(f, x, args=(t,), strategy="jet_jacobian_meet"), full[..., :3])
