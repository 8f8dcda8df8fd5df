import functools
import subprocess
import sys

import torch
from torch import nn

from autojac.signature import describe, signature

from helpers import mlp

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
    assert key(functools.partial(torch.sum, dim=-1)) != key(functools.partial(torch.sum, dim=0))


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
