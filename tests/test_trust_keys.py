"""Keys that cover what decides correctness and do not move (issue 15, item 5), and closure
constants and growing state that do not re-tune (issue 12, item 5).

A plan made for f must not serve an f whose behaviour changed in a way its key did not see (a
global switch, an attribute beyond the first 32, a flag missing from extra_repr, a replaced
forward, a captured tensor, Dropout's p); and a key must be the same in every process that makes
the same call (no hash order, no `__main__` versus module path). Tunings are counted from the
`autojac` logger's INFO records "tuned ...", which the README documents.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import autojac
from autojac import cli
from autojac.cache import default_store
from autojac.planner import Planner, set_default_planner

from helpers import assert_right as check
from helpers import diagonal_blocks, loop_jacobian, mlp

SOURCE = str(Path(autojac.__file__).resolve().parents[1])


def child_env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTOJAC_")}
    environ["PYTHONPATH"] = os.pathsep.join([SOURCE, *filter(None, [os.environ.get("PYTHONPATH")])])
    environ["AUTOJAC_TUNE_BUDGET"] = "0.2"
    environ.update(extra)
    return environ


# =================================================================================================
# Stale plans: each call after the change is right (the diagonal blocks of the whole-batch
# Jacobian are the reference: exact whether f mixes samples or not)
# =================================================================================================

CENTER = False


class GlobalSwitch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        if CENTER:  # a global read by forward: centering over the batch couples the samples
            x = x - x.mean(0)
        return torch.tanh(self.lin(x))


class ManyAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        for i in range(40):
            setattr(self, f"option_{i}", i % 3 == 0)
        self.center = False

    def forward(self, x):
        if self.center:
            x = x - x.mean(0)
        return torch.tanh(self.lin(x))


def _flip_global(model):
    global CENTER
    CENTER = True


def _monkeypatch_forward(model):
    original = model.forward
    model.forward = lambda x: original(x - x.mean(0))


STALE = {
    "global-switch": (GlobalSwitch, _flip_global),
    "over-32-attributes": (ManyAttributes, lambda model: setattr(model, "center", True)),
    "monkeypatched-forward": (lambda: mlp(3, 3, width=8), _monkeypatch_forward),
}


@pytest.mark.parametrize("name", STALE)
def test_a_change_the_key_must_see_gives_the_new_answer(name):
    global CENTER
    torch.manual_seed(0)
    make, change = STALE[name]
    model = make()
    x = torch.randn(4, 3)
    try:
        check(autojac.jacobian(model, x), diagonal_blocks(model, x), f"{name}: before the change")
        change(model)
        expected = diagonal_blocks(model, x)
        check(autojac.jacobian(model, x), expected,
              f"{name}: the call after a change that makes f mix samples (the old plan is stale)")
    finally:
        CENTER = False


def test_transformer_layers_differing_only_in_batch_first_get_their_own_answers():
    torch.manual_seed(0)
    first = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    second = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False).eval()
    second.load_state_dict(first.state_dict())
    x = torch.randn(3, 2, 8)
    check(autojac.jacobian(first, x), loop_jacobian(first, x), "batch_first=True")
    # batch_first=False reads dim 0 as the sequence: the samples attend to each other
    check(autojac.jacobian(second, x), diagonal_blocks(second, x),
          "batch_first=False, same weights and shapes (batch_first is not in extra_repr)")


def test_closures_with_the_same_code_capturing_different_tensors():
    def make(mixing):
        return lambda x: mixing @ torch.tanh(x)

    torch.manual_seed(0)
    x = torch.randn(4, 3)
    per_sample, mixing = make(torch.eye(4)), make(torch.eye(4) + torch.rand(4, 4))
    check(autojac.jacobian(per_sample, x), diagonal_blocks(per_sample, x), "identity mixing")
    check(autojac.jacobian(mixing, x), diagonal_blocks(mixing, x),
          "the same code capturing a dense mixing matrix of the same shape")


def test_dropout_p_raised_from_zero_in_training_is_refused_as_for_a_fresh_f():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.0), nn.Tanh(), nn.Linear(8, 2)).train()
    x = torch.randn(4, 3)
    check(autojac.jacobian(model, x), loop_jacobian(model, x), "p=0")
    fresh = copy.deepcopy(model)
    fresh[1].p = 0.5
    with pytest.raises(autojac.NonDeterministicError):
        autojac.jacobian(fresh, x)  # what a fresh f gets
    model[1].p = 0.5
    with pytest.raises(autojac.NonDeterministicError):
        autojac.jacobian(model, x)  # the same model, p raised after its plan was made


# =================================================================================================
# Keys that do not move between processes
# =================================================================================================

_KEYS = textwrap.dedent('''
    import json, torch
    from torch import nn
    import autojac

    class SetLiteral(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.kind = "tanh"
        def forward(self, x):
            if self.kind in {"tanh", "sigmoid", "softsign", "gelu", "silu", "elu"}:
                return torch.tanh(self.lin(x))
            return self.lin(x)

    def set_function(x, kind="tanh"):
        return torch.tanh(x) if kind in {"tanh", "sigmoid", "softsign", "gelu", "silu", "elu"} else x

    x = torch.randn(4, 3)
    print(json.dumps({name: autojac.explain(f, x, tune=False).key
                      for name, f in (("module", SetLiteral()), ("function", set_function))}))
''')


def test_a_set_literal_gives_the_same_key_under_any_hash_seed(tmp_path):
    script = tmp_path / "keys.py"
    script.write_text(_KEYS)
    runs = {seed: subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=child_env(PYTHONHASHSEED=seed,
                                                            AUTOJAC_CACHE_DIR=str(tmp_path / seed)))
            for seed in ("1", "2")}  # two seeds whose string hashes order this set differently
    keys = {}
    for seed, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err[-2000:]
        keys[seed] = out.strip().splitlines()[-1]
    assert keys["1"] == keys["2"], (f"the key of an f with a set literal depends on PYTHONHASHSEED: plans warmed "
                                    f"in one process are missing in another ({keys})")


_APP = textwrap.dedent('''
    import sys, torch
    from torch import nn
    import autojac

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        def forward(self, x):
            return self.body(x)

    def build():
        return Net()

    if __name__ == "__main__":
        try:
            autojac.jacobian(build(), torch.randn(4, 3))
        except autojac.PlanRequiredError as error:
            sys.exit(f"MISSING: {error}")
        print("FOUND")
''')


def test_a_class_in_main_finds_the_plan_warmed_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "trainapp.py").write_text(_APP)
    cache = tmp_path / "cache"
    # `autojac warm trainapp:build` (its code, in this process: it keys Net as trainapp.Net) ...
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(cache))
    monkeypatch.delitem(sys.modules, "trainapp", raising=False)
    set_default_planner(Planner(default_store()))
    try:
        assert cli.main(["warm", "trainapp:build", "--input-shape", "4,3", "--op", "jacobian"]) == 0
    finally:
        sys.modules.pop("trainapp", None)
    # ... then `python trainapp.py`, where Net is __main__.Net, must find that plan.
    ran = subprocess.run([sys.executable, "trainapp.py"], cwd=tmp_path,
                         env=child_env(AUTOJAC_CACHE_DIR=str(cache), AUTOJAC_REQUIRE_PLAN="1"),
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "FOUND" in ran.stdout, (
        f"`python trainapp.py` (Net in __main__) did not find the plan `autojac warm trainapp:build` made: "
        f"{(ran.stderr or ran.stdout).strip()[-600:]}")


# =================================================================================================
# Issue 12, item 5: closure constants and growing state do not re-tune
# =================================================================================================

@pytest.fixture
def tunings(caplog):
    """A function returning how many plans were tuned so far (the planner's INFO "tuned ...")."""
    caplog.set_level(logging.INFO, logger="autojac")
    return lambda: sum(1 for r in caplog.records if r.name == "autojac" and str(r.msg).startswith("tuned"))


def _dynamics():
    torch.manual_seed(0)
    net = mlp(3, 3, width=8)

    def dyn(t, z):
        return net(z) * (1.0 + t)

    return dyn, torch.randn(6, 3)


def test_an_ode_right_hand_side_with_a_new_float_t_tunes_once(tunings):
    dyn, z = _dynamics()
    for t in (0.0, 0.1, 0.25, 0.5, 1.0):
        rhs = lambda state: dyn(t, state)  # noqa: E731 - what a user hands an ODE solver
        check(autojac.jacobian(rhs, z), loop_jacobian(rhs, z), f"jacobian of lambda z: dyn({t}, z)")
    assert tunings() == 1, f"{tunings()} tunings for 5 values of a float the closure captures (expected 1)"


def test_a_partial_with_a_new_float_t_tunes_once(tunings):
    dyn, z = _dynamics()
    for t in (0.0, 0.1, 0.25, 0.5, 1.0):
        rhs = functools.partial(dyn, t)
        check(autojac.jacobian(rhs, z), loop_jacobian(rhs, z), f"jacobian of partial(dyn, {t})")
    assert tunings() == 1, f"{tunings()} tunings for 5 values of a float bound by functools.partial (expected 1)"


class LossHistory(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp(3, 1, width=8)
        self.losses: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)


def test_a_growing_list_of_detached_losses_does_not_retune(tunings):
    torch.manual_seed(0)
    model = LossHistory()
    x = torch.rand(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = autojac.laplacian(model, x, create_graph=True).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.losses.append(loss.detach())
    assert tunings() == 1, f"{tunings()} tunings over 5 training steps that append to model.losses (expected 1)"
