"""An adversarial review of planning, serving and trust (review2): each test is a bug found by
trying a real user pattern, and asserts the behaviour the README promises. References are
independent of autojac: the diagonal blocks of the whole-batch Jacobian from
torch.autograd.functional (exact whether f mixes samples or not), or a per-sample loop of it.

Work counts (tunings, re-checks of batch independence) are taken by wrapping autojac's own
functions; no test asserts a timing.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import warnings

import pytest
import torch
from torch import nn

import autojac
from autojac import planner as planner_module
from autojac.signature import describe
from autojac.timing import Clock

from helpers import assert_right, diagonal_blocks, loop_jacobian, mlp, relative_error

ALLOWED = 1e-4  # relative error of a float32 Jacobian against the reference


@pytest.fixture
def tunings(caplog):
    """How many plans were tuned so far (the planner's INFO "tuned ..." records)."""
    caplog.set_level(logging.INFO, logger="autojac")
    return lambda: sum(1 for r in caplog.records if r.name == "autojac" and str(r.msg).startswith("tuned"))


@pytest.fixture
def checks(monkeypatch):
    """How many re-checks of batch independence served calls ran so far (probes.quick_coupling)."""
    count = [0]
    real = planner_module.quick_coupling

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(planner_module, "quick_coupling", counted)
    return lambda: count[0]


# =================================================================================================
# Wrapping nn.Module.__setattr__ must not break the caller's program
# =================================================================================================

class EqualByType(nn.Module):
    """A module class that defines __eq__ (so Python sets its __hash__ to None), as some
    libraries' modules do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.lin(x))

    def __eq__(self, other):
        return type(other) is type(self)


def test_a_module_class_defining_eq_can_be_built_and_differentiated_after_autojac_ran():
    torch.manual_seed(0)
    autojac.jacobian(mlp(3, 2, width=4), torch.randn(4, 3))  # autojac is now installed in the process
    model = EqualByType()  # TypeError: unhashable type: 'EqualByType' (the __setattr__ wrapper hashes self)
    x = torch.randn(4, 3)
    assert_right(autojac.jacobian(model, x), loop_jacobian(model, x), "jacobian of a module defining __eq__")


class Stasher(nn.Module):
    """Keeps its last activation on an attribute (for a loss term, a visualisation)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.last = None

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.last = h.detach()
        return h


def test_torch_compile_fullgraph_of_a_planned_module_that_stashes_a_tensor():
    torch.manual_seed(0)
    model, x = Stasher(), torch.randn(4, 3)
    autojac.jacobian(model, x)  # the model is now watched
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    try:
        y = compiled(x)  # Unsupported: dynamo cannot trace sys._getframe in autojac's __setattr__ wrapper
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(y, torch.tanh(model.lin(x)))


# =================================================================================================
# Batch independence re-checked as a process runs: whatever object the caller passes as f
# =================================================================================================

class Gate(nn.Module):
    """A learned gate on a batch-mean term: zero when planned (batch-independent), then not."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return h + self.gate * h.mean(0, keepdim=True)


class Holder:
    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        return self.model(x)


@dataclasses.dataclass(slots=True)
class SlotsHolder:
    """A callable with __slots__: not weakly referenceable, no __dict__."""

    model: nn.Module

    def __call__(self, x):
        return self.model(x)


WRAPPERS = {
    "lambda-made-each-step": lambda model: (lambda x: model(x)),
    "partial-made-each-step": lambda model: functools.partial(Gate.forward, model),
    "holder-made-each-step": Holder,
    "slots-holder-kept": lambda model, kept={}: kept.setdefault(id(model), SlotsHolder(model)),
}


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_coupling_that_appears_is_caught_whatever_wraps_the_model(wrap):
    """The README: coupling that appears as weights train is caught at calls 16, 32, ... of a served
    plan. The count lives on the entry of one f object, so an f made anew at every step (a lambda
    around the model, a partial, a small callable) or one that cannot be held weakly is never
    re-checked: every call after the gate opens is wrong."""
    torch.manual_seed(0)
    model, x = Gate(), torch.randn(6, 3)
    make = WRAPPERS[wrap]
    assert_right(autojac.jacobian(make(model), x), diagonal_blocks(model, x), "before the coupling appears")
    with torch.no_grad():
        model.gate.fill_(0.7)
    expected = diagonal_blocks(model, x)
    errors = [relative_error(autojac.jacobian(make(model), x), expected) for _ in range(80)]
    right = [e <= ALLOWED for e in errors]
    assert any(right[:64]), (f"{wrap}: coupling that appeared after planning is still unseen after 64 calls "
                             f"(relative error {errors[63]:.3g}; {sum(not r for r in right)} of 80 calls wrong)")
    first = right.index(True)
    assert all(right[first:]), f"{wrap}: right at call {first + 1}, wrong again later"


def test_a_model_held_by_a_slots_object_is_seen_switching_to_training_mode():
    """The README: the signature holds the training flags of the modules f reaches, and f's
    attributes (a callable object's) are walked. A __slots__ object's attributes are not: its model
    is invisible, so .train() (BatchNorm now mixes samples) reuses the eval-mode plan."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).eval()
    f, x = SlotsHolder(model), torch.randn(6, 3)
    assert_right(autojac.jacobian(f, x), diagonal_blocks(model, x), "eval mode")
    model.train()
    expected = diagonal_blocks(model, x)  # BatchNorm in training mode: each sample moves the others
    assert_right(autojac.jacobian(f, x), expected, "the call after model.train()")


def test_coupling_found_under_autojac_require_plan_does_not_crash_the_served_call(monkeypatch):
    """Production mode: plans warmed, AUTOJAC_REQUIRE_PLAN=1. When the scheduled re-check finds that f
    mixes samples now, making the new plan is refused and the served call raises PlanRequiredError
    ("no stored plan for ...", though one is stored) at call 16, instead of serving an exact strategy."""
    torch.manual_seed(0)
    model, x = Gate(), torch.randn(6, 3)
    autojac.warm(model, x, ops=("jacobian",))
    monkeypatch.setenv("AUTOJAC_REQUIRE_PLAN", "1")
    autojac.jacobian(model, x)
    with torch.no_grad():
        model.gate.fill_(0.7)
    expected = diagonal_blocks(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = [relative_error(autojac.jacobian(model, x), expected) for _ in range(40)]
    assert errors[-1] <= ALLOWED, f"still wrong after 40 calls: relative error {errors[-1]:.3g}"


def test_a_served_call_with_tune_false_never_benchmarks_even_when_a_recheck_replans(tunings):
    """tune=False "never benchmarks" (README); the re-check's new plan follows AUTOJAC_TUNE instead of
    the call's tune=False and tunes in the middle of a served call."""
    torch.manual_seed(0)
    model, x = Gate(), torch.randn(6, 3)
    autojac.jacobian(model, x, tune=False)
    with torch.no_grad():
        model.gate.fill_(0.7)
    expected = diagonal_blocks(model, x)
    for _ in range(40):
        got = autojac.jacobian(model, x, tune=False)
    assert_right(got, expected, "40 calls after the coupling appeared")
    assert tunings() == 0, f"{tunings()} tunings for calls with tune=False"


def test_once_coupling_is_found_no_entry_of_that_signature_serves_the_old_plan():
    """The re-check that finds coupling rebinds its own entry only. Another entry of the same
    signature (the same model called with tune=False, an evaluation call) serves the old plan until
    its own schedule comes round (14 more wrong calls here; up to 4096 for an entry called often),
    while explain() already names the new plan."""
    torch.manual_seed(0)
    model, x = Gate(), torch.randn(6, 3)
    autojac.jacobian(model, x)
    autojac.jacobian(model, x, tune=False)  # another call shape of the same signature
    with torch.no_grad():
        model.gate.fill_(0.7)
    expected = diagonal_blocks(model, x)
    for _ in range(40):
        autojac.jacobian(model, x)
    assert not autojac.explain(model, x).batch_independent  # the planner knows f mixes samples now
    assert_right(autojac.jacobian(model, x, tune=False), expected, "the other entry's next call")


# =================================================================================================
# A plan served after f changed in a way its key leaves out: only batch independence is re-checked
# =================================================================================================

FREEZE = 0  # an int read at call time: data for the key (a step, a phase), by design


def _phased(net):
    def f(x):
        if FREEZE:  # from this phase on, the scale is a constant (no gradient through it)
            with torch.no_grad():
                scale = x.norm(dim=1, keepdim=True)
            return net(x / scale)
        return net(x)
    return f


def test_a_forward_mode_plan_is_not_served_once_f_enters_a_no_grad_block():
    """Forward mode (sum_fwd, the engine) ignores torch.no_grad(); the project's reference is reverse
    mode, and plans made without tuning are cross-checked once for exactly this. After a number
    that the key leaves out moves f into such a block, the plan (2 -> 32: forward mode) is served on,
    and only batch independence is checked again: the Jacobian is off by 100%."""
    global FREEZE
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32))
    f, x = _phased(net), torch.randn(16, 2)
    try:
        for _ in range(3):
            assert_right(autojac.jacobian(f, x, tune=False), loop_jacobian(f, x), "before the phase change")
        FREEZE = 1
        expected = loop_jacobian(f, x)
        for call in range(3):
            assert_right(autojac.jacobian(f, x, tune=False), expected, f"call {call + 1} after the phase change")
    finally:
        FREEZE = 0


def test_a_torch_class_forward_patched_at_the_class_level_is_noticed():
    """User classes' methods are guarded; torch's own are not: patching nn.Tanh.forward (as
    activation-swapping and LoRA-style tools do) serves the old plan for 15 more calls."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 3), nn.Tanh()), torch.randn(5, 3)
    for _ in range(3):
        autojac.jacobian(model, x)
    original = nn.Tanh.forward
    nn.Tanh.forward = lambda self, h: torch.tanh(h - h.mean(0))  # now mixes samples
    try:
        expected = diagonal_blocks(model, x)
        assert_right(autojac.jacobian(model, x), expected, "the call after nn.Tanh.forward was patched")
    finally:
        nn.Tanh.forward = original


class _Config:
    mode = "plain"


CONFIG = _Config()


def _configured(net):
    def f(x):
        if CONFIG.mode == "center":  # a switch on a config object: part of the key (README)
            x = x - x.mean(0)
        return net(x)
    return f


def test_a_switch_rebound_twice_between_calls_is_noticed():
    """Guards compare the identity (id) of what a slot held, without keeping it alive: a sweep that
    sets the switch from text twice between two calls can put the new string where the old one was,
    and the description (and the plan of the old mode) is kept."""
    torch.manual_seed(0)
    net, x = mlp(3, 3, width=8), torch.randn(5, 3)
    f = _configured(net)
    CONFIG.mode = "".join(["pla", "in"])  # read from a file or the command line, say
    try:
        assert_right(autojac.jacobian(f, x), diagonal_blocks(f, x), "mode plain")
        old = id(CONFIG.mode)
        CONFIG.mode = "".join(["xx", "yy"])
        CONFIG.mode = "".join(["cen", "ter"])
        if id(CONFIG.mode) != old:
            pytest.skip("this interpreter did not reuse the address of the old string")
        assert_right(autojac.jacobian(f, x), diagonal_blocks(f, x), "the call after the mode became 'center'")
    finally:
        CONFIG.mode = "plain"


# =================================================================================================
# Needless work on served calls
# =================================================================================================

STEP = 0


def _stepped(net):
    def f(x):
        return net(x) * (1.0 + 0.0 * STEP)  # a step counter read at call time (README: no new plan)
    return f


class CountingCallable:
    def __init__(self, net):
        self.net = net
        self.calls = 0

    def __call__(self, x):
        self.calls += 1  # an NFE counter, as ODE users keep
        return self.net(x)


class ShapeStasher(nn.Module):
    """Records the shape of its last input (not a tensor: a torch.Size)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.seen = None

    def forward(self, x):
        self.seen = x.shape
        return self.lin(x)


def _train_each_step(net, x, state):
    net.train()  # already in training mode: the standard training-loop idiom
    return autojac.jacobian(net, x)


def _global_step(net, x, state):
    global STEP
    STEP += 1000
    return autojac.jacobian(state.setdefault("f", _stepped(net)), x)


def _counting_callable(net, x, state):
    return autojac.jacobian(state.setdefault("f", CountingCallable(net)), x)


def _other_module_runs(net, x, state):
    state["other"](torch.randn(2, 3))  # another module of the program, run in between
    return autojac.jacobian(net, x)


LOOPS = {
    "model.train()-each-step": _train_each_step,
    "global-step-counter": _global_step,
    "callable-counting-its-calls": _counting_callable,
    "another-module-records-its-input-shape": _other_module_runs,
}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_served_plan_is_not_rechecked_at_every_call(loop, checks):
    """Batch independence is re-checked at calls 16, 32, ... (about two calls' cost each). A guard that
    fails without the fingerprint changing schedules a check on the next call, so these loops check
    at every call: each served call costs 3-5x what it should."""
    global STEP
    torch.manual_seed(0)
    net, x = mlp(3, 3, width=8), torch.randn(8, 3)
    other = ShapeStasher()
    autojac.jacobian(other, torch.randn(2, 3))  # planned for once, so autojac watches it
    state = {"other": other}
    step = LOOPS[loop]
    try:
        for _ in range(3):
            step(net, x, state)
        before = checks()
        for _ in range(40):
            step(net, x, state)
        done = checks() - before
    finally:
        STEP = 0
    assert done <= 4, f"{loop}: {done} re-checks of batch independence in 40 served calls (scheduled: 2)"


def test_a_lambda_made_at_every_step_is_served_without_describing_f_again(monkeypatch):
    """`autojac.jacobian(lambda z: model(z), x)` in a loop: each new lambda misses the table kept per f
    object, so every call walks and fingerprints f (and the model) again: 1.9x a served call on a
    3-layer MLP at B=16 (529 us against 274 us), though code and captures are the same."""
    from autojac import signature as signature_module

    torch.manual_seed(0)
    net, x = mlp(4, 4, width=16), torch.randn(16, 4)
    for _ in range(3):
        autojac.jacobian(lambda z: net(z), x)
    walks = []
    real = signature_module._walk
    monkeypatch.setattr(signature_module, "_walk", lambda f, **kw: walks.append(f) or real(f, **kw))
    for _ in range(20):
        autojac.jacobian(lambda z: net(z), x)
    assert len(walks) <= 2, f"f described {len(walks)} times in 20 calls of one lambda expression over one model"


def test_a_module_whose_stash_starts_as_none_is_tuned_once(tunings):
    """`self.last = None` in __init__, a tensor after the first forward: None is a switch in the
    fingerprint, a tensor is data, so the first re-description (any model.train()) tunes again."""
    torch.manual_seed(0)
    model, x = Stasher(), torch.randn(6, 3)
    autojac.jacobian(model, x)
    model.train()
    autojac.jacobian(model, x)
    assert tunings() == 1, f"{tunings()} tunings for one model whose stashed activation went from None to a tensor"


def _diffusion_score():
    torch.manual_seed(0)
    net = mlp(3, 2, width=8)

    def score(x, t):  # t an integer timestep, as diffusion samplers count them
        return net(torch.cat([x, torch.full((x.shape[0], 1), t / 1000.0)], 1))

    return score, torch.randn(8, 2)


def test_an_integer_timestep_passed_through_args_tunes_once(tunings):
    """The README: values passed through args are not part of the key, "so an ODE time that changes
    at every solver stage never makes a new plan". An int's value is (calls._arg_text): a tuning and
    a stored plan per timestep."""
    score, x = _diffusion_score()
    for t in (999, 998, 997, 996):
        assert_right(autojac.jacobian(score, x, args=(t,)), loop_jacobian(lambda z: score(z, t), x), f"t={t}")
    assert tunings() == 1, f"{tunings()} tunings for 4 integer timesteps passed through args (expected 1)"


def test_an_integer_timestep_captured_by_a_sampler_closure_tunes_once(tunings):
    """Issue 12, item 5: numbers captured by closures are not part of the key. Ints are (as "a dim, a
    size"), so a sampler's `lambda z: score(z, t)` over integer timesteps tunes at every step."""
    score, x = _diffusion_score()

    def sample(steps):
        for t in range(999, 999 - steps, -1):
            rhs = lambda z: score(z, t)  # noqa: E731 - what a sampler hands autojac
            assert_right(autojac.jacobian(rhs, x), loop_jacobian(rhs, x), f"t={t}")

    sample(4)
    assert tunings() == 1, f"{tunings()} tunings for 4 integer timesteps captured by a closure (expected 1)"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.act(self.lin(x))

    def act(self, h):
        return torch.tanh(h)


def test_the_hot_path_guards_do_not_grow_with_instances_of_one_class():
    """Each served call compares every guard; a user class's methods are guarded once per instance,
    so a 128-block model of one class has 516 guards (66 us a call) where 2 blocks have 12."""
    small = nn.Sequential(*[Block() for _ in range(2)])
    large = nn.Sequential(*[Block() for _ in range(128)])
    def count(guards):
        return len(guards.maps) + len(guards.attrs) + len(guards.items) + len(guards.cells)

    guards = {name: count(describe(model).guards) for name, model in (("2", small), ("128", large))}
    assert guards["128"] == guards["2"], f"guards per served call: {guards} (blocks of one class)"


class _Settings:
    pass


class Solver:
    """A callable holding its model and a settings object that points back at it (a parent
    pointer, as solver/problem or trainer/model pairs keep)."""

    def __init__(self):
        self.net = mlp(3, 1, width=8)
        self.settings = _Settings()
        self.settings.solver = self

    def __call__(self, x):
        return self.net(x)

    def residual(self, x):
        return self.net(x)


@pytest.mark.parametrize("how", ["object", "bound-method"])
def test_a_solver_with_a_back_reference_is_freed_after_use(how):
    """f's description guards the attribute dicts it walked; one of them holds f's own object (the
    back-reference), and the description is kept in a table by f: the object, its model and
    whatever it holds are never freed (a sweep making a solver per run grows without bound)."""
    import weakref

    torch.manual_seed(0)
    solver = Solver()
    f = solver if how == "object" else solver.residual
    autojac.jacobian(f, torch.randn(8, 3))
    alive = weakref.ref(solver)
    del solver, f
    gc.collect()
    assert alive() is None, "the solver (and its model) outlives every reference of the caller's"


def _seed_bytes() -> int:
    """Bytes of tensor storage alive in the process."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                try:  # (fake tensors left by torch.compile elsewhere have no storage to count)
                    storage = obj.untyped_storage()
                    pointer = storage.data_ptr()
                except (RuntimeError, NotImplementedError):
                    continue
                if pointer not in seen:
                    seen.add(pointer)
                    total += storage.nbytes()
    return total


def test_a_server_with_varying_batch_sizes_does_not_keep_seeds_for_each():
    """Seeds are cached per batch size (up to 2 MB each, 256 of them; up to 16 MB for bases): a server
    answering batches of 1..128 keeps 129 MB after the requests are gone (GPU memory on CUDA)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 64))
    before = _seed_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in range(1, 129):
            autojac.jacobian(net, torch.randn(batch, 8), strategy="sum_grad")
    held = _seed_bytes() - before
    assert held <= 32 * 2**20, f"{held / 2**20:.0f} MB of tensors held after serving batch sizes 1..128"


# =================================================================================================
# The cache directory followed mid-process (issue 12, item 6)
# =================================================================================================

def test_warm_writes_to_the_cache_directory_the_environment_names_now(monkeypatch, tmp_path):
    """A CI job warming for two targets in one process: the second directory gets nothing, since the
    plan is found in memory and never written there."""
    torch.manual_seed(0)
    model, x = mlp(4, 3, width=8), torch.randn(16, 4)
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(tmp_path / "first"))
    autojac.warm(model, x, ops=("jacobian",))
    assert len(autojac.plans()) == 1
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(tmp_path / "second"))
    made = autojac.warm(model, x, ops=("jacobian",))
    assert len(made) == 1
    stored = autojac.plans()
    assert [p.key for p in stored] == [made[0].key], (
        f"after autojac.warm with AUTOJAC_CACHE_DIR={tmp_path / 'second'}, plans() lists {len(stored)} plans")
    assert autojac.export_plans(tmp_path / "out.json") == 1


# =================================================================================================
# The engine on what it cannot see into
# =================================================================================================

def test_the_engine_on_a_scripted_module_is_right_or_refused():
    """torch.jit.script runs forward in C++: the engine sees no operation and returns zeros, while
    its check says it can follow f (caught later by the cross-check, with a warning)."""
    torch.manual_seed(0)
    scripted = torch.jit.script(mlp(4, 3, width=8))
    x = torch.randn(6, 4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = autojac.jacobian(scripted, x, strategy="jet_jacobian_rev")
    except ValueError as error:
        assert "does not apply" in str(error)
        return
    assert_right(got, loop_jacobian(scripted, x), "jet_jacobian_rev on a torch.jit.script module")


# =================================================================================================
# Two threads on one f
# =================================================================================================

def test_other_threads_are_not_served_a_plan_known_to_be_stale_while_it_is_made_again(monkeypatch):
    """Thread A's scheduled re-check finds that f mixes samples now and makes a new plan (a tuning:
    0.2-1 s). Meanwhile the entry still serves the old batch-independent strategy, so every call on
    the other threads in that window is wrong (60 of 60 calls on one of four threads, in a run)."""
    import threading

    torch.manual_seed(0)
    model, x = Gate(), torch.randn(6, 3)
    autojac.jacobian(model, x)
    with torch.no_grad():
        model.gate.fill_(0.7)
    expected = diagonal_blocks(model, x)
    replanning, release = threading.Event(), threading.Event()
    real = planner_module.Planner.plan

    def slow_plan(self, sig, problem, **options):
        if options.get("again"):  # the re-check found coupling: hold the new plan back a while
            replanning.set()
            release.wait(2)  # a fix that makes other threads wait costs this test 2 s at most
        return real(self, sig, problem, **options)

    monkeypatch.setattr(planner_module.Planner, "plan", slow_plan)

    def calls_until_a_recheck():
        for _ in range(40):
            autojac.jacobian(model, x)
            if replanning.is_set():
                return

    other = threading.Thread(target=calls_until_a_recheck)
    other.start()
    try:
        assert replanning.wait(30), "no re-check of batch independence within 40 calls"
        got = autojac.jacobian(model, x)  # this thread, while the other makes the new plan
    finally:
        release.set()
        other.join(30)
    assert_right(got, expected, "a call on another thread while the stale plan is being replaced")


# =================================================================================================
# explain() and plans()
# =================================================================================================

def test_plans_with_and_without_the_batch_independent_assertion_are_told_apart():
    """The README: a plan's header names the call's options where they differ from the defaults, so
    that the plans of one model are told apart. batch_independent=True is part of the key but of no
    plan field: `autojac plans` and explain() show two identical rows (with different strategies)."""
    torch.manual_seed(0)
    net, x = mlp(3, 1, width=8), torch.randn(16, 3)
    autojac.jacobian(net, x)
    autojac.jacobian(net, x, batch_independent=True)
    listed = [plan for plan in autojac.plans() if plan.op == "jacobian"]
    assert len(listed) == 2
    assert listed[0].options_text() != listed[1].options_text(), (
        f"two jacobian plans for one model and shape, listed alike: {[p.options_text() for p in listed]}")
    header = autojac.explain(net, x, batch_independent=True).summary().splitlines()[0]
    assert "batch_independent" in header, header


def test_a_tuning_warns_once_per_candidate_it_excludes():
    """tuner._majority warns about every disagreeing candidate each time it is asked, and the
    confirmation of the winner asks up to 2x the pool's size times: one excluded candidate, two
    warnings here; 15 warnings (3 per candidate) for one real autojac.laplacian of an f with a
    torch.no_grad() block."""
    import collections

    from autojac.strategies.registry import Strategy
    from autojac.timing import TuneSettings
    from autojac.tuner import Candidate, choose

    class Manual(Clock):
        t = 0.0

        def now(self) -> float:
            return self.t

    clock, answer = Manual(), torch.arange(6.0).view(2, 3)
    costs = {"bad": 1.0, "a": 1.0, "b": 1.02}

    def run(candidate):
        clock.t += costs[candidate.label]
        return answer + 1 if candidate.label == "bad" else answer

    pool = [Candidate(Strategy(name=name, ops=frozenset({"jacobian"}), run=None, memory=lambda s, c: 0), None, 0, rank)
            for rank, name in enumerate(costs)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = choose(pool, run, clock=clock, settings=TuneSettings(budget=5.0), tune=True)
    assert outcome.winner.label == "a" and "bad" in outcome.excluded
    warned = collections.Counter(str(w.message).split(" excluded")[0] for w in caught)
    assert all(count == 1 for count in warned.values()), f"warnings per excluded candidate: {dict(warned)}"
