"""No silent wrong answer (issue 15): one or more regression tests per item of its Build list.

1. grad modes; 2. x inside the caller's graph, non-leaf parameters; 3. plans used without tuning are
cross-checked; 4. batch independence re-checked as a process runs; 6. tolerances follow the
computation's dtype; 7. clear errors for odd inputs and torch.func transforms; 8. cache entries
whose strategy does not apply. Item 5 (keys) and issue 12's closure constants are in
test_trust_keys.py. References are independent of autojac: per-sample loops of
torch.autograd, torch.func, or float64 finite differences where PyTorch itself is wrong.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import autojac
from autojac.cache import default_store
from autojac.planner import Planner, set_default_planner
from autojac.strategies import registry
from autojac.timing import Clock

from helpers import (RELATIVE, assert_right, diagonal_blocks, finite_difference_hessian, graph_loop, loop_hessian,
                     loop_jacobian, mlp, relative_error, second_order_reference)

OPS = ("jacobian", "hessian", "hvp", "hessian_diag", "laplacian")
ALLOWED = RELATIVE
check = assert_right


def check_gradients(got, expected, names, what: str) -> None:
    for g, e, name in zip(got, expected, names):
        if e is None:
            e = torch.zeros(()) if g is None else torch.zeros_like(g)  # the reference does not depend on it
        if g is None and float(e.abs().max()) == 0:
            continue  # a parameter the result does not depend on (a last bias)
        assert g is not None, f"{what}: no gradient reached {name} (the reference's has norm {float(e.norm()):.3g})"
        error = relative_error(g, e)
        assert error <= 2e-3, f"{what}: gradient of {name} off by a relative {error:.3g}"


def grads(loss: torch.Tensor, params) -> list:
    return list(torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=True))


def autojac_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, autojac.AutojacWarning)]


def new_process(monkeypatch, tmp_path: Path, name: str, **environ: str) -> Path:
    """What a new process sees: a planner over a fresh cache directory (and the given variables)."""
    cache = tmp_path / name
    cache.mkdir()
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(cache))
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    set_default_planner(Planner(default_store()))
    return cache


# =================================================================================================
# 1. Grad modes
# =================================================================================================

@functools.lru_cache(maxsize=1)
def _standard():
    """A tanh MLP 3 -> 2 at B=4 (every strategy applies to it) and every operation's reference."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = mlp(3, 2, width=8)
        x, v = torch.randn(4, 3), torch.randn(4, 3)
    hessian = loop_hessian(model, x)
    refs = {"jacobian": loop_jacobian(model, x)}
    refs.update({op: second_order_reference(op, hessian, (3,), v) for op in OPS[1:]})
    return model, x, v, refs


def _call(op, model, x, v, **kwargs):
    return getattr(autojac, op)(*((model, x, v) if op == "hvp" else (model, x)), **kwargs)


MODES = {"normal": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
PER_STRATEGY = [(op, name) for op in OPS for name in registry.names(op)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op, strategy", PER_STRATEGY, ids=[f"{op}-{name}" for op, name in PER_STRATEGY])
def test_every_strategy_is_right_in_every_grad_mode(op, strategy, mode):
    model, x, v, refs = _standard()
    with MODES[mode]():
        try:
            result = _call(op, model, x, v, strategy=strategy)
        except ValueError as error:  # a coupled-only strategy may refuse a batch-independent f, by name
            if registry.get(strategy).coupled_only and "batch" in str(error):
                pytest.skip(f"{strategy} refuses a batch-independent f: {error}")
            raise
    check(result, refs[op], f"{op} with strategy={strategy} under {mode}", second=op != "jacobian")
    assert not result.requires_grad, f"{op} with strategy={strategy} under {mode} returned a result requiring grad"


@pytest.mark.parametrize("op", ["jacobian", "laplacian"])
def test_a_plan_tuned_outside_inference_mode_is_right_inside(op):
    torch.manual_seed(0)
    model = mlp(4, 1)
    x = torch.randn(6, 4)
    expected = loop_jacobian(model, x) if op == "jacobian" else second_order_reference(
        op, loop_hessian(model, x), (4,))
    check(getattr(autojac, op)(model, x), expected, f"{op} tuned in normal mode", second=op != "jacobian")
    with torch.inference_mode():
        result = getattr(autojac, op)(model, x)
    check(result, expected, f"{op}: the same plan reused under inference_mode", second=op != "jacobian")


@pytest.mark.parametrize("op", ["jacobian", "laplacian"])
def test_the_first_call_under_inference_mode_is_right_and_quiet(op):
    model, x, v, refs = _standard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            result = _call(op, model, x, v)
    check(result, refs[op], f"{op} tuned under inference_mode", second=op != "jacobian")
    assert not autojac_warnings(caught), (f"tuning under inference_mode warned (candidates that cannot run there "
                                          f"disagree): {autojac_warnings(caught)[0]}")


@pytest.mark.parametrize("op", ["jacobian", "hvp", "laplacian"])
def test_create_graph_inside_no_grad_is_connected_to_x_and_the_parameters(op):
    torch.manual_seed(0)
    model = mlp(3, 2, width=8)
    x, v = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    with torch.no_grad():
        result = _call(op, model, x, v, create_graph=True)
    assert result.grad_fn is not None, (f"{op}(create_graph=True) inside torch.no_grad() returned a result with no "
                                        f"graph (requires_grad={result.requires_grad}): backward would reach "
                                        f"nothing")
    expected = graph_loop(op, model, x, v)
    check(result, expected, f"{op} value", second=op != "jacobian")
    leaves = [*model.parameters(), x]
    names = [name for name, _ in model.named_parameters()] + ["x"]
    check_gradients(grads(result.square().sum(), leaves), grads(expected.square().sum(), leaves), names,
                    f"{op}(create_graph=True) made inside no_grad")


def test_create_graph_inside_inference_mode_is_refused_naming_it():
    model, x, v, refs = _standard()
    with pytest.raises((ValueError, TypeError), match="inference_mode"):
        with torch.inference_mode():
            autojac.jacobian(model, x, create_graph=True)


# =================================================================================================
# 2. x inside the caller's graph; MAML-style adapted parameters
# =================================================================================================

def _encoder_problem():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    decoder = mlp(3, 2, width=8)
    z = torch.randn(5, 4)
    return encoder, decoder, z


@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
@pytest.mark.parametrize("op", ["jacobian", "laplacian"])
def test_x_inside_the_callers_graph(op, create_graph):
    encoder, decoder, z = _encoder_problem()
    params = [*encoder.parameters(), *decoder.parameters()]
    names = [f"encoder.{n}" for n, _ in encoder.named_parameters()] + \
            [f"decoder.{n}" for n, _ in decoder.named_parameters()]
    x = torch.tanh(encoder(z))
    caller_loss = decoder(x).square().sum()  # the caller's own graph through x
    result = getattr(autojac, op)(decoder, x, create_graph=create_graph)

    expected = graph_loop(op, decoder, torch.tanh(encoder(z)))  # on a graph of its own
    check(result, expected, f"{op}(create_graph={create_graph}) at x = tanh(encoder(z))", second=op != "jacobian")
    if create_graph:
        check_gradients(grads(result.square().sum(), params), grads(expected.square().sum(), params), names,
                        f"{op}(create_graph=True): gradients through x into the encoder")
    try:
        got = grads(caller_loss, params)
    except RuntimeError as error:
        pytest.fail(f"the caller's own backward after autojac.{op} failed (its graph was freed): {error}")
    check_gradients(got, grads(decoder(torch.tanh(encoder(z))).square().sum(), params), names,
                    "the caller's own backward afterwards")


@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
@pytest.mark.parametrize("op", ["jacobian", "laplacian"])
def test_maml_adapted_parameters(op, create_graph):
    torch.manual_seed(0)
    model = mlp(3, 1, width=8)
    params = dict(model.named_parameters())
    support_x, support_y = torch.randn(6, 3), torch.randn(6, 1)

    def adapt():
        inner = (functional_call(model, params, (support_x,)) - support_y).square().mean()
        steps = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        return {k: p - 0.1 * g for (k, p), g in zip(params.items(), steps)}  # non-leaf parameters

    adapted = adapt()
    x = torch.randn(4, 3)
    result = getattr(autojac, op)(lambda z: functional_call(model, adapted, (z,)), x, create_graph=create_graph)

    fresh = adapt()
    expected = graph_loop(op, lambda z: functional_call(model, fresh, (z,)), x)
    check(result, expected, f"{op} with adapted parameters", second=op != "jacobian")
    meta = list(params.values())
    if create_graph:
        check_gradients(grads(result.square().sum(), meta), grads(expected.square().sum(), meta), list(params),
                        f"{op}(create_graph=True): meta-gradients through the adapted parameters")
    try:
        got = grads(functional_call(model, adapted, (support_x,)).square().mean(), meta)
    except RuntimeError as error:
        pytest.fail(f"the caller's meta-backward after autojac.{op} failed (its graph was freed): {error}")
    want = grads(functional_call(model, adapt(), (support_x,)).square().mean(), meta)
    check_gradients(got, want, list(params), "the caller's meta-backward afterwards")


# =================================================================================================
# 3. Plans used without tuning are cross-checked
# =================================================================================================

class LayerNormMLP(nn.Module):
    """PyTorch's nested forward mode through layer_norm is wrong (pytorch#196700), so fwd_fwd_diag,
    the heuristic's first diagonal strategy for vector outputs, is wrong for this model."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2)
        with torch.no_grad():
            self.norm.weight.add_(0.3 * torch.randn(8))
            self.norm.bias.add_(0.3 * torch.randn(8))

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def _layer_norm_problem():
    torch.manual_seed(3)
    model = LayerNormMLP()
    x = torch.randn(4, 3)
    expected = second_order_reference("laplacian", finite_difference_hessian(copy.deepcopy(model).double(), x), (3,))
    return model, x, expected


def test_layer_norm_laplacian_with_tune_false_is_right():
    model, x, expected = _layer_norm_problem()
    for call in (1, 2):
        check(autojac.laplacian(model, x, tune=False), expected,
              f"laplacian of a LayerNorm MLP, tune=False, call {call} (float64 finite differences)", second=True,
              dtype=torch.float32)


def test_layer_norm_laplacian_under_autojac_tune_0_is_right(monkeypatch):
    monkeypatch.setenv("AUTOJAC_TUNE", "0")
    model, x, expected = _layer_norm_problem()
    for call in (1, 2):
        check(autojac.laplacian(model, x), expected, f"laplacian of a LayerNorm MLP, AUTOJAC_TUNE=0, call {call}",
              second=True, dtype=torch.float32)


def test_layer_norm_laplacian_when_one_call_spends_the_budget_is_right(monkeypatch):
    # A large model's first candidate can take the whole budget: then it is the only one run.
    monkeypatch.setenv("AUTOJAC_TUNE_BUDGET", "0.001")
    model, x, expected = _layer_norm_problem()
    check(autojac.laplacian(model, x), expected, "laplacian of a LayerNorm MLP tuned with one candidate",
          second=True, dtype=torch.float32)


def test_a_heuristic_plan_shipped_from_ci_is_checked_in_production(monkeypatch, tmp_path):
    model, x, expected = _layer_norm_problem()
    autojac.warm(model, x, ops=("laplacian",), tune=False)  # CI, without tuning
    shipped = tmp_path / "plans.json"
    assert autojac.export_plans(shipped) >= 1
    new_process(monkeypatch, tmp_path, "production", AUTOJAC_PLANS=str(shipped), AUTOJAC_REQUIRE_PLAN="1")
    check(autojac.laplacian(model, x), expected, "laplacian served from a shipped heuristic plan", second=True,
          dtype=torch.float32)


class NoGradBlock(nn.Module):
    """(B, 2) -> (B, 6), part computed under torch.no_grad(): forward mode (sum_fwd, the heuristic's
    first choice when n < m) ignores the block; reverse mode and the per-sample loop respect it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 6), nn.Linear(2, 6)

    def forward(self, x):
        with torch.no_grad():
            target = torch.tanh(self.b(x))
        return torch.tanh(self.a(x)) + 0.5 * target


@pytest.mark.parametrize("how", ["tune=False", "AUTOJAC_TUNE=0"])
def test_a_no_grad_block_untuned_is_right(how, monkeypatch):
    torch.manual_seed(0)
    model = NoGradBlock()
    x = torch.randn(5, 2)
    if how == "AUTOJAC_TUNE=0":
        monkeypatch.setenv("AUTOJAC_TUNE", "0")
    result = autojac.jacobian(model, x, tune=False if how == "tune=False" else None)
    check(result, loop_jacobian(model, x), f"jacobian of an f with a no_grad block, {how}")


def _coupled(x):
    return torch.tanh(x - x.mean(0)) * x


def _edit_cache(**changes) -> Path:
    path = autojac.cache_path()
    assert path is not None and path.exists(), "the tuned call wrote no cache file"
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_a_stored_plan_claiming_batch_independence_for_a_coupled_f_is_checked(monkeypatch, tmp_path):
    """A plan file made elsewhere (another version of f, a crafted file) names the batch trick for
    an f that mixes samples: its first call here is cross-checked, so the answer is right."""
    x = torch.randn(4, 3)
    autojac.jacobian(_coupled, x)
    path = _edit_cache(strategy="sum_rev", chunk=None, batch_independent=True)
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(path.parent))
    set_default_planner(Planner(default_store()))  # a new process reading that file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", autojac.AutojacWarning)
        check(autojac.jacobian(_coupled, x), diagonal_blocks(_coupled, x),
              "jacobian of a coupled f from a stored plan that names the batch trick")


# =================================================================================================
# 4. Batch independence re-checked as a process runs
# =================================================================================================

class Gate(nn.Module):
    """A learned gate on a batch-mean term: 0 when planned (batch-independent), then trained away from 0."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return h + self.gate * h.mean(0, keepdim=True)


class MixingBuffer(nn.Module):
    """A mixing matrix over the batch kept as a buffer, changed in place (no key can see it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("mixing", torch.eye(6))

    def forward(self, x):
        return self.mixing @ torch.tanh(self.lin(x))


def _couple(model):
    with torch.no_grad():
        if isinstance(model, Gate):
            model.gate.fill_(0.7)
        else:
            model.mixing.copy_(torch.eye(6) + 0.3 * torch.rand(6, 6))


@pytest.mark.parametrize("make", [Gate, MixingBuffer], ids=["learned-gate", "buffer-in-place"])
def test_coupling_that_appears_after_planning_is_caught_within_64_calls(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(6, 3)
    check(autojac.jacobian(model, x), diagonal_blocks(model, x), "before the coupling appears")
    _couple(model)
    expected = diagonal_blocks(model, x)
    errors = [relative_error(autojac.jacobian(model, x), expected) for _ in range(64 + 32)]
    right = [e <= ALLOWED[torch.float32] for e in errors]
    assert any(right[:64]), (f"coupling that appeared after the plan was made is still unseen after 64 calls: "
                             f"relative error {errors[63]:.3g} (the old batch-independent plan is reused)")
    first = right.index(True)
    assert all(right[first:]), (f"right at call {first + 1} after the coupling appeared, wrong again at call "
                                f"{first + 1 + right[first:].index(False)}")


# =================================================================================================
# 6. Tolerances follow the computation's dtype and the scale of what is compared
# =================================================================================================

class StepClock(Clock):
    """A clock that advances `step` seconds at every reading: every candidate seems to cost the same and
    a budget buys a fixed number of readings, however busy the machine, so that which candidates get
    compared does not depend on the load."""

    def __init__(self, step: float = 0.1):
        self.t, self.step = 0.0, step

    def now(self) -> float:
        self.t += self.step
        return self.t


@pytest.fixture
def compare_every_candidate(monkeypatch):
    """Make tuning of `op` run (and cross-check) every candidate: a warm-up reads the clock about six
    times, so the budget covers all of them and little more."""
    def install(op: str) -> None:
        monkeypatch.setenv("AUTOJAC_TUNE_BUDGET", str(0.6 * len(registry.for_op(op)) + 0.5))
        set_default_planner(Planner(default_store(), clock=lambda device: StepClock()))
    return install


def _quiet_plan(make_call, explain, what: str):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = make_call()
        plan = explain()
    disagreeing = {label: why for label, why in plan.excluded.items() if "disagree" in why}
    assert not disagreeing, f"{what}: candidates excluded as disagreeing: {disagreeing}"
    assert not autojac_warnings(caught), f"{what}: spurious AutojacWarning: {autojac_warnings(caught)[0]}"
    return result


def test_float64_x_into_a_float32_model_raises_no_false_disagreement(compare_every_candidate):
    compare_every_candidate("jacobian")
    torch.manual_seed(0)
    model = mlp(5, 4, width=32)

    def f(x):
        return model(x.float())

    x = torch.randn(32, 5, dtype=torch.float64)
    result = _quiet_plan(lambda: autojac.jacobian(f, x), lambda: autojac.explain(f, x), "float64 x, float32 model")
    check(result, loop_jacobian(f, x), "jacobian", dtype=torch.float32)


def test_autocast_bfloat16_raises_no_false_disagreement(compare_every_candidate):
    compare_every_candidate("jacobian")
    torch.manual_seed(0)
    model = mlp(6, 4, width=32)
    x = torch.randn(16, 6)
    expected = loop_jacobian(model, x)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return autojac.jacobian(model, x)

    def explain():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return autojac.explain(model, x)

    result = _quiet_plan(run, explain, "autocast bfloat16")
    error = relative_error(result, expected)
    assert error <= 6e-2, f"jacobian under autocast: relative error {error:.3g} (bfloat16 allows 6e-2)"


def test_hard_constraint_pinn_laplacian_at_b2048_raises_no_false_disagreement(compare_every_candidate):
    compare_every_candidate("laplacian")
    torch.manual_seed(5)  # weights where float32 double backward and forward over reverse differ by 4.5e-4

    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))

    def u(x):  # the usual hard constraint of a box (here the interval (0, 1)): zero on its boundary
        return (x * (1 - x)).prod(-1, keepdim=True) * net(x)

    x = torch.rand(2048, 1)
    result = _quiet_plan(lambda: autojac.laplacian(u, x), lambda: autojac.explain(u, x, op="laplacian"),
                         "float32 hard-constraint PINN, B=2048")
    twin = copy.deepcopy(net).double()
    expected = torch.func.vmap(torch.func.hessian(lambda xi: (xi * (1 - xi)).prod() * twin(xi.unsqueeze(0))[0, 0]))(
        x.double()).reshape(2048, 1)
    check(result, expected, "laplacian of the hard-constraint PINN", second=True, dtype=torch.float32)


# =================================================================================================
# 7. Odd inputs and torch.func transforms
# =================================================================================================

def _raised_by_autojac(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(
        str(Path(autojac.__file__).resolve().parent))


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "meta"])
@pytest.mark.parametrize("op", ["jacobian", "hessian"])
def test_unsupported_x_is_refused_naming_x(op, layout):
    model, x, v, refs = _standard()
    odd = {"sparse_coo": x.to_sparse(), "sparse_csr": x.to_sparse_csr(),
           "meta": torch.empty(4, 3, device="meta")}[layout]
    with pytest.raises((ValueError, TypeError)) as caught:
        getattr(autojac, op)(model, odd)
    message = str(caught.value)
    word = "meta" if layout == "meta" else "sparse"
    assert _raised_by_autojac(caught.value), f"a raw torch error, not autojac's: {message[:200]}"
    assert re.search(r"\bx\b", message) and word in message.lower(), (
        f"the error for a {layout} x does not name x and its {word} layout/device: {message[:200]}")


def _transform_outcome(run, reference, what: str) -> None:
    """Either autojac works inside the transform (and equals the reference) or it says it cannot
    run there and what to use instead."""
    try:
        got = run()
    except Exception as error:  # judged: it must be autojac's own, clear refusal
        message = str(error)
        assert _raised_by_autojac(error), f"{what}: torch's raw error leaked: {type(error).__name__}: {message[:200]}"
        assert "torch.func" in message and ("instead" in message or "use " in message), (
            f"{what}: autojac's error does not say it cannot run inside a torch.func transform and what to use: "
            f"{message[:200]}")
        return
    want = reference()
    for key in (want if isinstance(want, dict) else {"": want}):
        g, e = (got[key], want[key]) if key else (got, want)
        error = relative_error(g, e)
        assert error <= 2e-3, f"{what}: relative error {error:.3g} {key}"


def test_laplacian_inside_torch_func_grad():
    torch.manual_seed(0)
    model = mlp(2, 1, width=8)
    params = {k: p.detach() for k, p in model.named_parameters()}
    x = torch.rand(6, 2)

    def loss(p):
        return autojac.laplacian(lambda z: functional_call(model, p, (z,)), x, create_graph=True).square().mean()

    def loss_ref(p):
        def u(xi):
            return functional_call(model, p, (xi.unsqueeze(0),))[0, 0]
        return torch.func.vmap(lambda xi: torch.func.hessian(u)(xi).trace())(x).square().mean()

    _transform_outcome(lambda: torch.func.grad(loss)(params), lambda: torch.func.grad(loss_ref)(params),
                       "autojac.laplacian inside torch.func.grad")


def test_jacobian_inside_torch_func_vmap():
    model, x, v, refs = _standard()
    xs = torch.randn(3, 4, 3)
    _transform_outcome(lambda: torch.func.vmap(lambda xb: autojac.jacobian(model, xb))(xs),
                       lambda: torch.stack([loop_jacobian(model, xb) for xb in xs]),
                       "autojac.jacobian inside torch.func.vmap")


# =================================================================================================
# 8. A cache entry whose strategy does not apply is skipped with a warning, and planned again
# =================================================================================================

def _data_dependent(x):
    if float(x.detach().abs().max()) > 1e6:  # a Python branch on a value: vmap cannot run it
        return x
    return torch.sin(x) * x.sum(-1, keepdim=True)


@pytest.mark.parametrize("entry", ["jet_laplacian-for-an-f-it-cannot-follow", "vmap_rev-for-a-vmap-failing-f"])
def test_a_cache_entry_whose_strategy_does_not_apply_is_replanned(entry, monkeypatch):
    torch.manual_seed(0)
    if entry.startswith("jet_laplacian"):
        net = mlp(3, 1, width=8)
        f = lambda z: torch.cumprod(net(z).repeat(1, 2), 1)[:, -1:]  # noqa: E731 - no rule for cumprod
        op, changes = "laplacian", {"strategy": "jet_laplacian", "chunk": None}
    else:
        f, op, changes = _data_dependent, "jacobian", {"strategy": "vmap_rev", "chunk": None, "vmap_ok": True}
    x = torch.randn(4, 3)
    expected = loop_jacobian(f, x) if op == "jacobian" else second_order_reference(op, loop_hessian(f, x), (3,))
    getattr(autojac, op)(f, x)
    path = _edit_cache(**changes)
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(path.parent))
    set_default_planner(Planner(default_store()))  # a new process reading the edited cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = getattr(autojac, op)(f, x)
    check(result, expected, f"{op} after a cache entry naming {changes['strategy']}", second=op != "jacobian")
    assert autojac_warnings(caught), f"the unusable cache entry ({changes['strategy']}) was skipped without a warning"
    assert autojac.explain(f, x, op=op).strategy != changes["strategy"], "no new plan was made"
