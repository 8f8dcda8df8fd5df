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


def finite_difference_hessian(f64, x: torch.Tensor, step: float = 1e-5) -> torch.Tensor:
    """(B, *out, *in, *in) in float64 by central differences of the per-sample Jacobian (reverse
    mode, whose first derivatives PyTorch gets right): the reference where PyTorch's own higher
    derivatives are wrong (nested forward mode through fused normalizations, pytorch#196700).
    f64 is f with float64 parameters."""
    x = x.detach().to(torch.float64)
    in_shape, n = tuple(x.shape[1:]), int(torch.Size(x.shape[1:]).numel())
    columns = []
    for i in range(n):
        shift = torch.zeros(n, dtype=torch.float64)
        shift[i] = step
        shift = shift.reshape(in_shape)
        columns.append((loop_jacobian(f64, x + shift) - loop_jacobian(f64, x - shift)) / (2 * step))
    stacked = torch.stack(columns, -1)  # (B, *out, *in, n)
    return stacked.reshape(*stacked.shape[:-1], *in_shape)


def graph_loop(op: str, f, x: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """What `op` gives, differentiable w.r.t. f's parameters (and x, or whatever x was made from, when
    it requires grad): an explicit loop of torch.autograd.functional over samples, create_graph=True.
    f must be batch-independent."""
    samples = x if x.requires_grad else x.detach()
    in_shape = tuple(x.shape[1:])
    if op == "jacobian":
        return torch.stack([torch.autograd.functional.jacobian(lambda xi: f(xi.unsqueeze(0)).squeeze(0),
                                                               samples[b], create_graph=True)
                            for b in range(x.shape[0])])
    hessian = loop_hessian(f, samples, create_graph=True)
    return second_order_reference(op, hessian, in_shape, v)


# Relative to the reference's largest entry, by the dtype the computation ran in.
RELATIVE = {torch.float64: 1e-7, torch.float32: 2e-4}
RELATIVE_SECOND = {torch.float64: 1e-6, torch.float32: 2e-3}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over the largest |expected| (inf for a shape mismatch or NaN)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    diff = float((actual.detach().double() - expected.detach().double()).abs().max())
    return float("inf") if diff != diff else diff / max(float(expected.detach().abs().max()), 1e-6)


def assert_right(actual: torch.Tensor, expected: torch.Tensor, what: str, *, second: bool = False,
                 dtype: torch.dtype | None = None) -> None:
    """Assert actual equals the reference, saying by how much it does not (and if it is all zeros)."""
    allowed = (RELATIVE_SECOND if second else RELATIVE)[dtype or expected.dtype]
    error = relative_error(actual, expected)
    zeros = " (all zeros)" if actual.numel() and float(actual.detach().abs().max()) == 0 else ""
    assert error <= allowed, (f"{what}: relative error {error:.3g}{zeros} against the independent reference "
                              f"(allowed {allowed:g}); shapes {tuple(actual.shape)} vs {tuple(expected.shape)}")


def directional_fd(params, directions, loss, eps: float = 1e-5) -> float:
    """d loss / d params along directions by central differences (run it in float64)."""
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.add_(eps * d)
        up = loss()
        for p, d in zip(params, directions):
            p.sub_(2 * eps * d)
        down = loss()
        for p, d in zip(params, directions):
            p.add_(eps * d)
    return ((up - down) / (2 * eps)).item()
