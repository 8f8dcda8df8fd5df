import functools
import subprocess
import sys

import torch
from torch import nn

from autojac.signature import describe, signature

import autojac

from helpers import assert_close, diagonal_blocks, mlp

X = torch.randn(4, 5)


def key(f, x=X, **kw):
    return signature("jacobian", f, x, **kw).key


def test_weights_do_not_matter_but_structure_does():
    assert key(mlp(5, 3)) == key(mlp(5, 3))  # other random weights
    assert key(mlp(5, 3)) != key(mlp(5, 3, width=32))
    assert key(mlp(5, 3)) != key(mlp(5, 3, depth=3))
    a = nn.Sequential(nn.Linear(5, 3), nn.Tanh())
    b = nn.Sequential(nn.Linear(5, 3), nn.Sigmoid())
    assert key(a) != key(b)


def test_training_mode_changes_the_signature():
    model = mlp(5, 3)
    trained = key(model)
    model.eval()
    assert key(model) != trained
    model[1].train()  # one submodule back in training mode
    assert key(model) not in (trained, key(mlp(5, 3).eval()))


def test_shape_dtype_batch_and_options_change_the_signature():
    model = mlp(5, 3)
    base = key(model)
    assert key(model, torch.randn(8, 5)) != base
    assert key(model.double(), X.double()) != base
    assert key(mlp(5, 3), create_graph=True) != base
    assert key(mlp(5, 3), batch_independent=True) != base
    assert signature("hessian", mlp(5, 3), X).key != base


def test_functions_are_told_apart_by_code_and_by_what_they_close_over():
    small, wide = mlp(5, 3), mlp(5, 3, width=64)
    assert key(lambda x: small(x)) != key(lambda x: wide(x))
    assert key(lambda x: torch.sin(x)) != key(lambda x: torch.cos(x))
    # an int bound when f is made is data to the key (a diffusion step must not make a plan per step),
    # but a new f whose ints differ is checked before it is served: cumsum over the batch mixes samples
    within, across = functools.partial(torch.cumsum, dim=1), functools.partial(torch.cumsum, dim=0)
    assert key(within) == key(across)
    x = torch.randn(4, 5)
    assert_close(autojac.jacobian(within, x), diagonal_blocks(within, x))
    assert_close(autojac.jacobian(across, x), diagonal_blocks(across, x))


MODEL = mlp(5, 3)


def uses_global(x):
    return MODEL(x)


def test_a_rebound_global_is_noticed():
    global MODEL
    before = key(uses_global)
    old, MODEL = MODEL, mlp(5, 3, width=64)
    try:
        assert key(uses_global) != before
    finally:
        MODEL = old
    assert key(uses_global) == before


def test_bound_methods_are_described_once_per_module():
    model = mlp(5, 3)
    assert describe(model.forward) is describe(model.forward)
    assert key(model.forward) == key(model.forward)


def test_device_and_versions_are_part_of_the_signature():
    sig = signature("jacobian", mlp(5, 3), X)
    assert sig.device == "cpu" and sig.device_name and sig.torch_version == torch.__version__


def test_the_key_is_stable_across_processes():
    code = ("import torch, sys; sys.path.insert(0, 'tests'); from helpers import mlp; "
            "from autojac.signature import signature; "
            "print(signature('jacobian', mlp(5, 3), torch.randn(4, 5)).key)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == key(mlp(5, 3))


CENTER = False
STEP = 0


def centred_if_asked(x):
    return torch.sin(x - x.mean(0)) if CENTER else torch.sin(x)


def scaled_by_step(x):
    return torch.sin(x) * (1 + STEP)


def test_a_switch_read_from_a_global_is_part_of_the_fingerprint():
    global CENTER
    before = key(centred_if_asked)
    autojac.jacobian(centred_if_asked, X)  # planned for a batch-independent f
    CENTER = True
    try:
        assert key(centred_if_asked) != before
        # the switch made f batch-coupled: a plan made before must not be used
        assert_close(autojac.jacobian(centred_if_asked, X), diagonal_blocks(centred_if_asked, X))
    finally:
        CENTER = False
    assert key(centred_if_asked) == before


def test_a_number_read_at_call_time_is_not_so_a_step_counter_does_not_retune():
    global STEP
    before = key(scaled_by_step)
    for STEP in range(1, 4):
        assert key(scaled_by_step) == before
    STEP = 0


def test_containers_a_function_closes_over_are_walked():
    def make(config):
        return lambda x: torch.sin(x - x.mean(0)) if config["center"] else torch.sin(x)

    assert key(make({"center": False})) != key(make({"center": True}))
    assert key(make({"center": False})) == key(make({"center": False}))


class Switchable:
    def __init__(self, model):
        self.model = model
        self.center = False
        self.step = 0
        self.losses = []

    def __call__(self, x):
        self.step += 1
        self.losses.append(float(x.sum()))
        return self.model(x - x.mean(0) if self.center else x)


def test_a_callable_objects_attributes_are_watched_but_counters_and_histories_are_not():
    obj = Switchable(mlp(5, 3))
    first = key(obj)
    obj(X)  # its step counter and loss history change
    obj(X)
    assert key(obj) == first
    obj.center = True
    assert key(obj) != first


class Trainer:
    """Not callable itself: f is one of its methods."""

    def __init__(self, model):
        self.model = model

    def residual(self, x):
        return self.model(x)


def test_a_bound_method_reaches_the_model_its_object_holds():
    norm = nn.BatchNorm1d(5).eval()
    trainer = Trainer(norm)
    evaluated = signature("jacobian", trainer.residual, X)
    norm.train()
    trained = signature("jacobian", trainer.residual, X)
    assert trained.key != evaluated.key and trained.training != evaluated.training


def test_a_submodule_swapped_in_place_is_noticed():
    model = mlp(5, 3)
    before = key(model)
    kept = model[1]  # the old submodule stays alive: no identity can be reused
    model[1] = nn.BatchNorm1d(model[0].out_features)
    assert key(model) != before
    model[1] = kept
    assert key(model) == before


class Stashing(nn.Module):
    """Keeps its last activation on an attribute: a new tensor on every call."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 3)
        self.last = None

    def forward(self, x):
        self.last = torch.tanh(self.layer(x))
        return self.last


def test_a_module_that_stashes_a_tensor_each_call_is_not_described_again(monkeypatch):
    from autojac import signature as signature_module

    model = Stashing()
    model(X)
    first = key(model)
    walks = []
    real = signature_module._walk
    monkeypatch.setattr(signature_module, "_walk", lambda f, **kw: walks.append(f) or real(f, **kw))
    for _ in range(3):
        model(X)  # a new tensor of the same shape on model.last
        assert key(model) == first
    assert not walks  # a plain tensor assigned to a module: no new description
    model(torch.randn(7, 5))  # a stashed tensor is data, whatever its shape
    assert key(model) == first and not walks
