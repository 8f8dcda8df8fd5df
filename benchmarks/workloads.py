"""The functions the benchmark differentiates, and the suites of cases built from them.

A `Workload` is a named factory for f and the per-sample input shape; a `Case` is a workload
at one batch size, dtype and operation. Names are unique across suites: the peak-memory
subprocess (`benchmarks.peak`) rebuilds a case from its workload's name alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autojac.models import OPS

SECOND_ORDER = ("hessian", "hvp", "hessian_diag", "laplacian")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Workload:
    """f (built by `build`, seeded) applied to x of shape (B, *in_shape)."""

    name: str
    title: str
    build: Callable[[], Callable[[Tensor], Tensor]]
    in_shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return math.prod(self.in_shape)


@dataclass(frozen=True)
class Case:
    """One measurement: a workload at a batch size and dtype, for one operation."""

    suite: str
    workload: Workload
    op: str
    batch: int
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return f"{self.workload.name} B={self.batch} {self.dtype}"

    def make(self, device: torch.device | str = "cpu") -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor | None]:
        """(f, x, v): f on `device` in the case's dtype, x of shape (B, *in), v (hvp only) like x."""
        dtype = DTYPES[self.dtype]
        torch.manual_seed(0)
        f = self.workload.build()
        if isinstance(f, nn.Module):
            f = f.to(device=device, dtype=dtype).eval()
        x = torch.randn(self.batch, *self.workload.in_shape, dtype=dtype, device=device)
        v = torch.randn_like(x) if self.op == "hvp" else None
        return f, x, v


class Squeeze(nn.Module):
    """(B, 1) -> (B,): a scalar per sample."""

    def forward(self, y: Tensor) -> Tensor:
        return y.squeeze(-1)


def mlp(n_in: int, hidden: list[int], n_out: int | None, activation: type[nn.Module] = nn.Tanh,
        last: nn.Module | None = None) -> nn.Sequential:
    """Linear layers with `activation` between them; n_out None gives a scalar per sample."""
    widths = [n_in, *hidden, n_out or 1]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), activation()]
    layers = layers[:-1]
    if last is not None:
        layers.append(last)
    if n_out is None:
        layers.append(Squeeze())
    return nn.Sequential(*layers)


def mlp_workload(name: str, n_in: int, hidden: list[int], n_out: int | None, title: str = "",
                 activation: type[nn.Module] = nn.Tanh, last: type[nn.Module] | None = None) -> Workload:
    shape = "scalar" if n_out is None else str(n_out)
    title = title or f"MLP {n_in} -> {' -> '.join(map(str, hidden))} -> {shape} ({activation.__name__.lower()})"
    return Workload(name, title, lambda: mlp(n_in, hidden, n_out, activation, last() if last else None), (n_in,))


class AffineCoupling(nn.Module):
    """A RealNVP coupling layer on `dim` features: half passes through, half is scaled and shifted
    by an MLP of the first half. (B, dim) -> (B, dim)."""

    def __init__(self, dim: int = 16, hidden: int = 64):
        super().__init__()
        self.half = dim // 2
        self.net = mlp(self.half, [hidden, hidden], 2 * (dim - self.half))

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.half], x[:, self.half:]
        scale, shift = self.net(x1).chunk(2, dim=-1)
        return torch.cat([x1, x2 * torch.exp(torch.tanh(scale)) + shift], dim=-1)


class SmallConvNet(nn.Module):
    """(B, 1, 28, 28) -> (B, 10): two strided convolutions and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2)  # -> 8 x 13 x 13
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)  # -> 16 x 6 x 6
        self.head = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(h.flatten(1))


def per_sample_fn(x: Tensor) -> Tensor:
    """Elementwise and per-sample reduction ops, no parameters: (B, n) -> (B, n)."""
    norm = x.pow(2).sum(-1, keepdim=True).sqrt()
    return torch.tanh(x) * norm + torch.softmax(x, dim=-1) - torch.logsumexp(x, dim=-1, keepdim=True) * torch.sin(x)


def _grid_mlp(n_in: int, n_out: int) -> Workload:
    return mlp_workload(f"mlp-{n_in}-64-64-{n_out}", n_in, [64, 64], n_out)


def _second_order_mlp(n_in: int, n_out: int | None) -> Workload:
    shape = "s" if n_out is None else str(n_out)
    return mlp_workload(f"tanh-{n_in}-64-64-{shape}", n_in, [64, 64], n_out)


WORKLOADS: tuple[Workload, ...] = (
    mlp_workload("pinn-2-32x3", 2, [32, 32, 32], None, "physics-informed u(x, t): 2 -> 32x3 -> scalar (tanh)"),
    mlp_workload("pinn-3-128x4", 3, [128] * 4, None, "physics-informed u(x, y, t): 3 -> 128x4 -> scalar (tanh)"),
    mlp_workload("pinn-3-64x2-3", 3, [64, 64], 3, "physics-informed (u, v, p)(x, y, t): 3 -> 64x2 -> 3 (tanh)"),
    mlp_workload("classifier-784", 784, [128], 10, "classifier 784 -> 128 -> 10 (gelu)", activation=nn.GELU),
    mlp_workload("decoder-8-784", 8, [128, 256], 784, "decoder 8 -> 128 -> 256 -> 784 (tanh, sigmoid)",
                 last=nn.Sigmoid),
    Workload("flow-coupling-16", "affine coupling layer 16 -> 16 (normalizing flow)", AffineCoupling, (16,)),
    Workload("convnet-28", "small conv net (1, 28, 28) -> 10", SmallConvNet, (1, 28, 28)),
    Workload("per-sample-fn-64", "per-sample function 64 -> 64 (tanh, norm, softmax, logsumexp)",
             lambda: per_sample_fn, (64,)),
)
TINY: tuple[Workload, ...] = (
    mlp_workload("tiny-mlp-3-8-2", 3, [8], 2),
    mlp_workload("tiny-mlp-2-8-s", 2, [8], None),
)
DESIGN_GRID = tuple(_grid_mlp(n, m) for n in (2, 64, 512) for m in (1, 64, 512))
SECOND_ORDER_GRID = tuple(_second_order_mlp(n, m) for n in (2, 16, 128) for m in (None, 4))


@functools.cache
def catalog() -> dict[str, Workload]:
    """Every workload of every suite, by name."""
    found: dict[str, Workload] = {}
    for workload in (*WORKLOADS, *TINY, *DESIGN_GRID, *SECOND_ORDER_GRID):
        if found.setdefault(workload.name, workload) is not workload:
            raise ValueError(f"two workloads are named {workload.name!r}")
    return found


def _by_name(name: str) -> Workload:
    return catalog()[name]


def _suite_design_grid(ops: tuple[str, ...]) -> list[Case]:
    # The 27 shapes of docs/design.md: CPU, MLP with two hidden layers of 64, float32, the Jacobian.
    if "jacobian" not in ops:
        return []
    return [Case("design-grid", w, "jacobian", b) for b in (1, 32, 512) for w in DESIGN_GRID]


def _suite_second_order(ops: tuple[str, ...]) -> list[Case]:
    # B in {32, 512} x input widths {2, 16, 128} x scalar and vector outputs, tanh MLP.
    return [Case("second-order", w, op, b) for op in ops if op in SECOND_ORDER
            for b in (32, 512) for w in SECOND_ORDER_GRID]


def _suite_workloads(ops: tuple[str, ...]) -> list[Case]:
    # Second-order operations only where a per-sample Hessian is a sensible size (64 inputs or fewer).
    double = {"pinn-2-32x3", "pinn-3-64x2-3", "per-sample-fn-64"}  # where float64 is common
    return [Case("workloads", w, op, b, dtype) for op in ops for w in WORKLOADS for b in (1, 32, 512, 2048)
            for dtype in ("float32", "float64")
            if (dtype == "float32" or w.name in double) and (op == "jacobian" or w.n <= 64)]


def _suite_quick(ops: tuple[str, ...]) -> list[Case]:
    grid = [("mlp-64-64-64-64", 1), ("mlp-2-64-64-512", 32), ("mlp-512-64-64-1", 32), ("mlp-64-64-64-64", 512)]
    cases: list[Case] = []
    if "jacobian" in ops:
        cases += [Case("quick", _by_name(name), "jacobian", b) for name, b in grid]
        cases += [Case("quick", _by_name(name), "jacobian", 32) for name in
                  ("pinn-2-32x3", "classifier-784", "decoder-8-784", "convnet-28", "per-sample-fn-64")]
        cases.append(Case("quick", _by_name("pinn-2-32x3"), "jacobian", 32, "float64"))
    cases += [Case("quick", _by_name(name), op, 32) for op in ops if op in SECOND_ORDER
              for name in ("tanh-2-64-64-s", "tanh-16-64-64-4")]
    return cases


def _suite_tiny(ops: tuple[str, ...]) -> list[Case]:
    return [Case("tiny", w, op, 4) for op in ops for w in TINY]


SUITES: dict[str, Callable[[tuple[str, ...]], list[Case]]] = {
    "design-grid": _suite_design_grid,
    "second-order": _suite_second_order,
    "workloads": _suite_workloads,
    "quick": _suite_quick,
    "tiny": _suite_tiny,
}
FULL = ("design-grid", "second-order", "workloads")


def suite(name: str, ops: tuple[str, ...] = OPS) -> list[Case]:
    """The cases of suite `name` for the operations in `ops`; unknown names list the known ones."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name](ops)
