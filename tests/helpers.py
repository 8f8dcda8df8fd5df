"""Independent references and small models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def chunks_to_try(strategy, batch: int, n: int, m: int) -> list:
    """Every chunk size the strategy offers for these sizes, plus 2 (a chunk that leaves a short
    last piece) for strategies that vectorize over a basis; None (all at once) first."""
    from autojac.problem import Sizes

    chunks = set(strategy.chunk_options(Sizes(batch=batch, n=n, m=m, itemsize=4, activations=0)))
    if strategy.basis is not None:
        chunks.add(2)
    return sorted(chunks, key=lambda c: (c is not None, c or 0))


def loop_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """(B, *out, *in) by an explicit loop of torch.autograd.functional.jacobian over samples."""
    rows = [torch.autograd.functional.jacobian(lambda xi: f(xi.unsqueeze(0)).squeeze(0), x[b].detach())
            for b in range(x.shape[0])]
    return torch.stack(rows)


def diagonal_blocks(f, x: torch.Tensor) -> torch.Tensor:
    """(B, *out, *in): the diagonal blocks of the whole-batch Jacobian (exact for coupled f)."""
    full = torch.autograd.functional.jacobian(f, x.detach())  # (B, *out, B, *in)
    batch, out_dims = x.shape[0], full.dim() - x.dim() - 1
    return torch.stack([full.select(out_dims + 1, b)[b] for b in range(batch)])


def mlp(n_in: int = 5, n_out: int = 3, width: int = 16, depth: int = 2, dtype=torch.float32) -> nn.Module:
    layers: list[nn.Module] = []
    sizes = [n_in] + [width] * depth
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(sizes[-1], n_out))
    return nn.Sequential(*layers).to(dtype)


class SmallConv(nn.Module):
    """(B, 1, 8, 8) -> (B, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class MatrixOut(nn.Module):
    """(B, 6) -> (B, 2, 3): a matrix per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.lin(x)).view(-1, 2, 3)


class ScalarOut(nn.Module):
    """(B, 4) -> (B,): one scalar per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def data_dependent(x: torch.Tensor) -> torch.Tensor:
    """A Python branch on a tensor's value: vmap refuses it, autograd does not mind."""
    if float(x.detach().abs().max()) > 1e6:
        return x
    return torch.sin(x) * x.sum(-1, keepdim=True)


def centered(x: torch.Tensor) -> torch.Tensor:
    """Batch-coupled: every output depends on the whole batch through the mean."""
    return torch.tanh(x - x.mean(0)) * x


def loop_hessian(f, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """(B, *out, *in, *in) by torch.autograd.functional.hessian per sample and output element.

    With create_graph the result is differentiable w.r.t. x and f's parameters."""
    in_shape = tuple(x.shape[1:])
    out_shape = tuple(f(x[:1].detach()).shape[1:])
    samples = []
    for b in range(x.shape[0]):
        xb = x[b] if create_graph else x[b].detach()
        per_output = [
            torch.autograd.functional.hessian(lambda xi, k=k: f(xi.unsqueeze(0)).reshape(-1)[k], xb,
                                              create_graph=create_graph)
            for k in range(max(1, int(torch.Size(out_shape).numel())))
        ]
        samples.append(torch.stack(per_output).view(*out_shape, *in_shape, *in_shape))
    return torch.stack(samples)


def second_order_reference(op: str, hessian: torch.Tensor, in_shape: tuple[int, ...],
                           v: torch.Tensor | None = None) -> torch.Tensor:
    """What `op` should give, from per-sample Hessians (B, *out, *in, *in)."""
    n = int(torch.Size(in_shape).numel())
    lead = hessian.shape[: hessian.dim() - 2 * len(in_shape)]
    square = hessian.reshape(*lead, n, n)
    if op == "hessian":
        return hessian
    if op == "hvp":
        flat_v = v.reshape(v.shape[0], *(1,) * (len(lead) - 1), n, 1)
        return (square @ flat_v).reshape(*lead, *in_shape)
    diag = square.diagonal(dim1=-2, dim2=-1)
    return diag.reshape(*lead, *in_shape) if op == "hessian_diag" else diag.sum(-1)


def coupled_hessian(f, x: torch.Tensor) -> torch.Tensor:
    """(B, *out, *in, *in): diagonal blocks of the whole-batch Hessian (exact for coupled f)."""
    x = x.detach()
    batch, in_shape = x.shape[0], tuple(x.shape[1:])
    out_shape = tuple(f(x).shape[1:])
    blocks = []
    for b in range(batch):
        per_output = []
        for k in range(max(1, int(torch.Size(out_shape).numel()))):
            full = torch.autograd.functional.hessian(lambda z, b=b, k=k: f(z)[b].reshape(-1)[k], x)
            per_output.append(full[b].select(len(in_shape), b))  # full is (B, *in, B, *in)
        blocks.append(torch.stack(per_output).view(*out_shape, *in_shape, *in_shape))
    return torch.stack(blocks)
