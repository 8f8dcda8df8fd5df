"""The engine's strategies on the models people write: wrapped modules, residual nets, attention over a
per-sample sequence, normalizations, hard constraints, Fourier features, SIREN, networks of (x, t);
with and without create_graph (gradients w.r.t. parameters and x checked against references);
results that never go stale; and "does not apply" instead of an exception."""

import functools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import autojac
from autojac.jet import api
from autojac.problem import Problem
from autojac.strategies import get

from helpers import assert_close, loop_hessian, loop_jacobian, second_order_reference

DT = torch.float64
SECOND = {"laplacian": "jet_laplacian", "hessian_diag": "jet_laplacian", "hvp": "jet_hvp", "hessian": "jet_hessian"}
JACOBIAN = ("jet_jacobian_fwd", "jet_jacobian_rev", "jet_jacobian_meet")


def _mlp(n_in, n_out=1, width=6, activation=nn.Tanh):
    return nn.Sequential(nn.Linear(n_in, width), activation(), nn.Linear(width, width), activation(),
                         nn.Linear(width, n_out))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp(3)

    def forward(self, x):
        return self.net(x).squeeze(-1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lift, self.block, self.head = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.lift(x))
        h = h + torch.sin(self.block(h))
        return self.head(h)


class Attention(nn.Module):
    """Self-attention over a per-sample sequence of 3 tokens of width 2 (x of shape (B, 6))."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(2, 4)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        tokens = x.view(x.shape[0], 3, 2)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(4), dim=-1)
        return self.head(torch.matmul(weights, v).flatten(1))


class Normalized(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lift = nn.Linear(3, 8)
        self.norm = {"layer": nn.LayerNorm(8), "group": nn.GroupNorm(2, 4), "batch": nn.BatchNorm1d(8)}[kind]
        self.head = nn.Linear(8, 1)
        with torch.no_grad():
            for p in self.norm.parameters():
                p.add_(torch.linspace(-0.3, 0.3, p.numel()).view_as(p))
        if kind == "batch":
            self.norm.running_mean.copy_(torch.linspace(-0.2, 0.2, 8))
            self.norm.running_var.copy_(torch.linspace(0.5, 1.5, 8))
            self.norm.eval()

    def forward(self, x):
        h = self.lift(x)
        h = self.norm(h.view(-1, 4, 2)).flatten(1) if self.kind == "group" else self.norm(h)
        return self.head(torch.tanh(h))


class Fourier(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("freq", torch.linspace(-1, 1, 12).view(3, 4))
        self.net = _mlp(8)

    def forward(self, x):
        z = 2 * math.pi * x @ self.freq
        return self.net(torch.cat([torch.sin(z), torch.cos(z)], -1))


class Siren(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.sin(3.0 * self.b(torch.sin(3.0 * self.a(x)))))


class SpaceTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp(3)

    def forward(self, x, t):
        return self.net(torch.cat([x, t], dim=1))


def _scaled(x, scale, net):
    return net(x * scale)[:, 0]


def make(name):
    torch.manual_seed(0)
    if name == "sequential":
        return _mlp(3, 2)
    if name == "wrapped":
        return Wrapped()
    if name == "hard_constraint":
        net = _mlp(3)
        return _holding(lambda x: (x * (1 - x)).prod(-1, keepdim=True) * net(x), net)
    if name == "hard_constraint_1d":
        net = _mlp(3)
        return _holding(lambda x: x[:, :1] * (1 - x[:, :1]) * net(x), net)
    if name == "residual":
        return Residual()
    if name == "attention":
        return Attention()
    if name in ("layer_norm", "group_norm", "batch_norm_eval"):
        return Normalized(name.split("_")[0])
    if name == "fourier":
        return Fourier()
    if name == "siren":
        return Siren()
    if name == "space_time":
        net = SpaceTime()
        return _holding(lambda xt: net(xt[:, :2], xt[:, 2:]), net)
    if name == "partial":
        net = _mlp(3)
        return _holding(functools.partial(_scaled, scale=2.0, net=net), net)
    if name == "reshaping":
        net = _mlp(3, 4)
        return _holding(lambda x: torch.cat([net(x).view(-1, 2, 2)[:, 1], x[:, :1] ** 2], 1).unsqueeze(1).squeeze(1), net)
    raise ValueError(name)


def _holding(f, module):
    f.module = module
    return f


def parameters(f):
    return list((f if isinstance(f, nn.Module) else f.module).parameters())


MODELS = ["sequential", "wrapped", "hard_constraint", "hard_constraint_1d", "residual", "attention", "layer_norm",
          "group_norm", "batch_norm_eval", "fourier", "siren", "space_time", "partial", "reshaping"]
IN = {"attention": 6}
INEXACT = {"layer_norm", "group_norm", "batch_norm_eval"}  # PyTorch's higher derivatives there are wrong


def _setup(name):
    f = make(name)
    for p in parameters(f):
        p.data = p.data.to(DT)
    for b in (f if isinstance(f, nn.Module) else f.module).buffers():
        b.data = b.data.to(DT)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, IN.get(name, 3), generator=generator, dtype=DT)
    v = torch.randn(3, IN.get(name, 3), generator=generator, dtype=DT)
    return f, x, v


def reference_hessian(f, x):
    """(B, *out, *in, *in), by finite differences of first derivatives (right in PyTorch everywhere)."""
    step = 1e-5
    n = x.shape[1]
    columns = []
    for j in range(n):
        e = torch.zeros_like(x)
        e[:, j] = step
        columns.append((loop_jacobian(f, x + e) - loop_jacobian(f, x - e)) / (2 * step))
    return torch.stack(columns, -1)


def reference(name, f, x):
    return reference_hessian(f, x) if name in INEXACT else loop_hessian(f, x)


def tolerance(name):
    return dict(rtol=1e-5, atol=1e-6) if name in INEXACT else dict(rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_every_engine_strategy_matches_the_reference(name):
    f, x, v = _setup(name)
    h = reference(name, f, x)
    for op, forward in SECOND.items():
        problem = Problem(op, f, x, v if op == "hvp" else None)
        for strategy in (forward, "jet_fwd_rev"):
            assert get(strategy).applies(problem) == "", (name, strategy)
            for chunk in (None, 2):
                torch.testing.assert_close(get(strategy)(problem, chunk),
                                           second_order_reference(op, h, (x.shape[1],), v), **tolerance(name))
    expected = loop_jacobian(f, x)
    for strategy in JACOBIAN:
        problem = Problem("jacobian", f, x)
        why = get(strategy).applies(problem)
        if strategy == "jet_jacobian_meet" and name in ("hard_constraint", "hard_constraint_1d"):
            assert "no layer that every path" in why  # x reaches the output beside the network
            continue
        assert why == "", (name, strategy)
        for chunk in (None, 1):
            assert_close(get(strategy)(problem, chunk), expected)


def _loss_gradient(compute, f, x):
    """Gradients of sum(result^2) w.r.t. f's parameters and x."""
    xg = x.detach().requires_grad_(True)
    result = compute(xg)
    assert result.requires_grad
    return torch.autograd.grad(result.square().sum(), [*parameters(f), xg], allow_unused=True)


@pytest.mark.parametrize("name, op", [
    *((name, "laplacian") for name in ("wrapped", "residual", "attention", "fourier", "space_time", "layer_norm",
                                        "group_norm")),
    ("residual", "hessian_diag"), ("layer_norm", "hessian_diag"),  # (the other models share these rules)
    ("residual", "hessian_diag/jet_fwd_rev"), ("layer_norm", "laplacian/jet_fwd_rev"),
])
def test_create_graph_gives_the_right_gradients(name, op):
    f, x, _ = _setup(name)
    op, _, named = op.partition("/")
    strategy = get(named or SECOND[op])
    ours = _loss_gradient(lambda xg: strategy(Problem(op, f, xg, create_graph=True)), f, x)
    if name not in INEXACT:
        expected = _loss_gradient(lambda xg: second_order_reference(op, loop_hessian(f, xg, create_graph=True),
                                                                    (x.shape[1],)), f, x)
        for a, b in zip(ours, expected):
            assert (a is None) == (b is None)
            if a is not None:
                assert_close(a, b)
        return
    # PyTorch's third-order reverse mode through the normalization is wrong: compare the derivative
    # along a random direction of every parameter and x with finite differences of the loss.
    params = parameters(f)
    generator = torch.Generator().manual_seed(2)
    directions = [torch.randn(p.shape, generator=generator, dtype=DT) for p in [*params, x]]
    along = sum((g * d).sum() for g, d in zip(ours, directions) if g is not None)

    def loss(eps):
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(eps * d)
        try:
            h = reference_hessian(f, x + eps * directions[-1])
            return second_order_reference(op, h, (x.shape[1],)).square().sum()
        finally:
            with torch.no_grad():
                for p, d in zip(params, directions):
                    p.sub_(eps * d)

    step = 1e-4
    torch.testing.assert_close(along, (loss(step) - loss(-step)) / (2 * step), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", JACOBIAN)
def test_jacobians_with_create_graph_give_the_right_gradients(strategy):
    f, x, _ = _setup("residual")
    ours = _loss_gradient(lambda xg: get(strategy)(Problem("jacobian", f, xg, create_graph=True)), f, x)
    expected = _loss_gradient(lambda xg: torch.stack([
        torch.autograd.functional.jacobian(lambda xi: f(xi[None])[0], xg[b], create_graph=True)
        for b in range(xg.shape[0])]), f, x)
    for a, b in zip(ours, expected):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


def test_several_results_in_one_pass_and_the_divergence():
    f, x, v = _setup("residual")
    square = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    out = api.derivatives(f, x, ("value", "jacobian", "laplacian"))
    assert set(out) == {"value", "jacobian", "laplacian"}
    assert_close(out["value"], f(x))
    assert_close(out["jacobian"], loop_jacobian(f, x))
    assert_close(out["laplacian"], second_order_reference("laplacian", loop_hessian(f, x), (3,)))
    both = api.derivatives(f, x, ("jacobian", "hessian"))
    assert_close(both["hessian"], loop_hessian(f, x))
    assert_close(both["jacobian"], loop_jacobian(f, x))
    hv = api.derivatives(f, x, ("hvp",), v=v, chunk=2)["hvp"]
    assert_close(hv, second_order_reference("hvp", loop_hessian(f, x), (3,), v))
    expected = loop_jacobian(square, x).diagonal(dim1=1, dim2=2).sum(-1)
    for g in (square, lambda z: torch.sin(square(z))):  # its last operation a linear layer, and not
        for chunk in (None, 2):
            assert_close(api.divergence(g, x, chunk), loop_jacobian(g, x).diagonal(dim1=1, dim2=2).sum(-1))
    assert_close(api.divergence(square, x), expected)
    with pytest.raises(ValueError, match="one second-order quantity per pass"):
        api.derivatives(f, x, ("laplacian", "hessian"))
    with pytest.raises(ValueError, match="as many elements per sample as its input"):
        api.divergence(f, x)


# ---------------------------------------------------------------------------------------------
# Never stale: whatever f reads is read afresh at every call

def _laplacian(f, x):
    return second_order_reference("laplacian", loop_hessian(f, x), (x.shape[1],))


def _both_ways(f, x):
    """The tuned public call and the engine named: both must be right."""
    return autojac.laplacian(f, x), autojac.laplacian(f, x, strategy="jet_laplacian")


def _check(f, x):
    expected = _laplacian(f, x)
    for result in _both_ways(f, x):
        assert_close(result, expected)


def test_parameters_updated_in_place_by_an_optimizer():
    f, x, _ = _setup("wrapped")
    _check(f, x)
    optimizer = torch.optim.SGD(f.parameters(), lr=0.5)
    for _ in range(2):
        loss = autojac.laplacian(f, x, create_graph=True).square().mean() + f(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _check(f, x)


def test_parameters_and_submodules_reassigned():
    f, x, _ = _setup("sequential")
    _check(f, x)
    f[0].weight = nn.Parameter(torch.randn(6, 3, dtype=DT))
    _check(f, x)
    f[1] = nn.Sigmoid()
    _check(f, x)
    f[3] = nn.LayerNorm(6).double()  # a new kind of layer, mid-network
    _check(f, x)


def test_functional_call_with_new_parameters_every_call():
    net, x, _ = _setup("sequential")
    state = {"params": dict(net.named_parameters())}
    f = lambda z: functional_call(net, state["params"], (z,))  # noqa: E731
    for step in range(3):
        state["params"] = {k: p.detach() + 0.1 * (step + 1) * torch.ones_like(p) for k, p in net.named_parameters()}
        _check(f, x)


T_NOW = 0.5


def _at_time(x):
    return torch.sin(T_NOW * x).sum(-1, keepdim=True) * _at_time.net(x)


def test_numbers_read_from_globals_and_attributes():
    global T_NOW
    net, x, _ = _setup("sequential")
    _at_time.net = net
    for t in (0.5, 1.5, -2.0):
        T_NOW = t
        _check(_at_time, x)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.net = 1.0, net

        def forward(self, z):
            return self.net(self.scale * z)

    model = Scaled()
    for scale in (1.0, 3.0, 0.25):
        model.scale = scale
        _check(model, x)


def test_python_branches_on_state_and_on_values():
    net, x, _ = _setup("sequential")

    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.mode, self.net = "tanh", net

        def forward(self, z):
            h = self.net(z)
            h = torch.tanh(h) if self.mode == "tanh" else h ** 3
            return h * 2 if float(z.detach().abs().max()) > 0.9 else h  # a branch on a value

    model = Switch()
    for mode in ("tanh", "cube", "tanh"):
        model.mode = mode
        _check(model, x)
        _check(model, x * 0.5)


def test_a_closure_whose_captured_tensor_is_rebound_or_changed():
    net, x, _ = _setup("sequential")
    w = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    f = lambda z: net(z * w)  # noqa: E731
    _check(f, x)
    w = torch.tensor([-1.0, 0.5, 2.0], dtype=DT)  # rebinds the closure's cell
    _check(f, x)
    w.mul_(3)  # changes it in place
    _check(f, x)


def test_a_call_that_leaves_the_engine_is_computed_another_way():
    net, x, _ = _setup("sequential")

    def f(z):
        h = net(z)
        return torch.cumprod(h.repeat(1, 2), 1)[:, -1:] if float(z.max()) > 10 else h

    assert get("jet_laplacian").applies(Problem("laplacian", f, x)) == ""
    _check(f, x)
    far = x + 20  # the same shape, the path with an operation the engine has no rule for
    assert_close(autojac.laplacian(f, far, strategy="jet_laplacian"), _laplacian(f, far))
    assert_close(get("jet_laplacian")(Problem("laplacian", f, far)), _laplacian(f, far))


def test_in_place_operations_are_followed():
    net, x, _ = _setup("sequential")

    def f(z):
        h = net[0](z)
        h.mul_(0.5)
        h += 1
        h = F.silu(h, inplace=True)
        out = torch.zeros(z.shape[0], 3, dtype=z.dtype)
        out[:, 1:] = net[2](h)[:, :2]
        out[:, 0] = z[:, 0] ** 2
        return out

    for strategy in ("jet_laplacian", "jet_hessian"):
        problem = Problem("hessian" if strategy == "jet_hessian" else "laplacian", f, x)
        assert get(strategy).applies(problem) == ""
        assert_close(get(strategy)(problem), second_order_reference(problem.op, loop_hessian(f, x), (3,)))

    def reads_after_update(z):
        h = torch.sin(z)
        view = h[:, :2]
        h.mul_(2)  # the view sees the update; its coefficients would not
        return view * z[:, :2]

    why = get("jet_laplacian").applies(Problem("laplacian", reads_after_update, x))
    assert "in place" in why


def test_in_place_operations_in_reverse_mode_and_across_spans():
    net, x, _ = _setup("sequential")

    def updates(z):  # its updates are what f reads on: followed by every form
        h = F.silu(net[0](z), inplace=True)
        h *= 2
        return net[2](h.add_(1))

    def reads_the_base(z):  # the base of a view updated in place: written back, or refused
        h = torch.sin(net[0](z))
        h[:, :2].mul_(3)
        return net[2](h)

    for f in (updates, reads_the_base):
        h = loop_hessian(f, x)
        for op, strategy in (("hessian", "jet_fwd_rev"), ("laplacian", "jet_fwd_rev"), ("hessian", "jet_hessian")):
            problem = Problem(op, f, x)
            assert_close(get(strategy)(problem), second_order_reference(op, h, (3,)))
        for strategy in JACOBIAN:
            assert_close(get(strategy)(Problem("jacobian", f, x)), loop_jacobian(f, x))
    with torch.no_grad():  # written back, one direction per span: no span reads another's update
        assert_close(api.jacobian(updates, x, chunk=1), loop_jacobian(updates, x))
        assert_close(api.second_order("laplacian", updates, x, chunk=1),
                     second_order_reference("laplacian", loop_hessian(updates, x), (3,)))
    with torch.enable_grad():  # not written back: the base may not be read
        with pytest.raises(api.Unsupported, match="in place"):
            api.jacobian(reads_the_base, x)


@pytest.mark.parametrize("inside", ["autograd.grad", "vmap", "grad"])
def test_f_that_differentiates_inside_is_refused_by_name(inside):
    net = _mlp(3)

    def gradient(z):
        with torch.enable_grad():
            leaf = z.detach().requires_grad_()
            return torch.autograd.grad(net(leaf).sum(), leaf, create_graph=True)[0]

    f = {"autograd.grad": gradient, "vmap": lambda z: torch.func.vmap(net)(z),
         "grad": lambda z: torch.func.vmap(torch.func.grad(lambda zi: net(zi)[0]))(z)}[inside]
    why = get("jet_jacobian_fwd").applies(Problem("jacobian", f, torch.randn(4, 3)))
    assert ("torch.autograd.grad" if inside == "autograd.grad" else "torch.func transform") in why


# ---------------------------------------------------------------------------------------------
# Does not apply, never raises

@pytest.mark.parametrize("f, reason", [
    (lambda x: torch.cumprod(x, 1), "no rule for torch.cumprod"),
    (lambda x: torch.linalg.inv(x.view(-1, 2, 2)).flatten(1), "no rule for torch.linalg.inv"),
    (lambda x: torch.nn.functional.dropout(x, 0.5, training=True), "dropout in training mode"),
    (lambda x: x.sort(1).values, "no rule for torch.Tensor.sort"),
    (lambda x: x.tolist() and torch.special.bessel_j0(x), "no rule for torch.special.bessel_j0"),
])
def test_an_operation_without_a_rule_is_named(f, reason):
    x = torch.randn(4, 4, dtype=DT)
    for strategy in ("jet_laplacian", "jet_hessian", "jet_hvp", *JACOBIAN):
        assert reason in get(strategy).applies(Problem("laplacian", f, x))
    if "dropout" not in reason:  # a random f is refused before any plan is made
        assert autojac.explain(f, x, op="laplacian").excluded["jet_laplacian"] == f"does not apply: {reason}"


def test_f_that_fails_or_swallows_the_engine_error_is_not_an_exception():
    x = torch.randn(4, 3, dtype=DT)

    def swallows(z):
        try:
            return torch.cumprod(z, 1)
        except Exception:
            return torch.sin(z)  # a path f would not take outside the engine

    assert "no rule for torch.cumprod" in get("jet_laplacian").applies(Problem("laplacian", swallows, x))

    def fails(z):
        raise RuntimeError("boom")

    assert "boom" in get("jet_laplacian").applies(Problem("laplacian", fails, x))

    def two_rows_fail(z):  # fails on the two-sample slice the check starts with, not on x
        if z.shape[0] == 2:
            raise RuntimeError("two")
        return torch.tanh(z)

    assert get("jet_laplacian").applies(Problem("laplacian", two_rows_fail, x)) == ""


def test_large_results_are_ordinary_tensors():
    from autojac.jet import memory

    like = torch.zeros(1, dtype=DT)
    big = memory.empty((3, memory.LARGE // 8 // 3 + 1), like)  # over the threshold: maybe huge pages
    assert big.shape == (3, memory.LARGE // 8 // 3 + 1) and big.dtype == DT and big.is_contiguous()
    big.fill_(2.0)
    assert big.sum().item() == 2.0 * big.numel()
    small = memory.empty((2, 3), like)
    assert small.shape == (2, 3) and small.dtype == DT


def test_blocks_of_samples_and_spans_of_directions_give_the_same_results(monkeypatch):
    from autojac.jet import reverse

    f, x, v = _setup("residual")
    x, v = torch.cat([x, x.flip(0) * 0.5]), torch.cat([v, -v])  # 6 samples
    h = loop_hessian(f, x)
    expected = {op: second_order_reference(op, h, (3,), v) for op in SECOND}
    jac = loop_jacobian(f, x)
    api.derivatives(f, x, ("laplacian",))  # the engine learns f's widest value: later calls are split
    for kind in ("jacobian", "laplacian", "hessian_diag", "hessian"):
        block, chunk = api.spans_of_work(f, x, kind, None)
        assert isinstance(block, int) and (chunk is None or isinstance(chunk, int) and chunk >= 1)
    monkeypatch.setattr(api, "BLOCK_BYTES", 1)
    monkeypatch.setattr(api, "SMALLEST_BLOCK", 4)  # blocks of 4 and 2 samples, one direction per span
    monkeypatch.setattr(api, "SPAN_BYTES", 1)
    assert api.spans_of_work(f, x, "laplacian", None) == (4, 1)
    for op in SECOND:
        assert_close(api.second_order(op, f, x, v), expected[op])
        assert_close(reverse.second_order_by_adjoints(op, f, x, v), expected[op])
    out = api.derivatives(f, x, ("value", "jacobian", "hessian_diag"))
    assert_close(out["value"], f(x))
    assert_close(out["jacobian"], jac)
    assert_close(out["hessian_diag"], expected["hessian_diag"])
    assert_close(api.jacobian(f, x), jac)
    xg = x.clone().requires_grad_(True)  # differentiable through the blocks
    (gradient,) = torch.autograd.grad(api.second_order("laplacian", f, xg).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (expected_gradient,) = torch.autograd.grad(
        second_order_reference("laplacian", loop_hessian(f, xr, create_graph=True), (3,)).sum(), xr)
    assert_close(gradient, expected_gradient)
