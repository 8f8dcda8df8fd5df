"""End-to-end tests of autojac.jacobian and autojac.explain."""

import copy
import logging

import pytest
import torch
from torch import nn

import autojac
from autojac.planner import default_planner

from helpers import MatrixOut, ScalarOut, SmallConv, assert_close, centered, data_dependent, diagonal_blocks, \
    loop_jacobian, mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("factory, in_shape, out_shape", [
    (lambda: mlp(5, 10, width=2, depth=1), (5,), (10,)),  # the seed problem: 5 -> 10, batch 3
    (SmallConv, (1, 8, 8), (4,)),
    (ScalarOut, (4,), ()),
    (MatrixOut, (6,), (2, 3)),
])
def test_jacobian_matches_the_per_sample_loop(factory, in_shape, out_shape, dtype):
    f = factory().to(dtype)
    x = torch.randn(3, *in_shape, dtype=dtype)
    result = autojac.jacobian(f, x)
    assert result.shape == (3, *out_shape, *in_shape) and result.dtype == dtype
    assert_close(result, loop_jacobian(f, x))


def test_first_call_tunes_and_later_calls_reuse_the_plan(monkeypatch):
    f, x = mlp(5, 3), torch.randn(4, 5)
    autojac.jacobian(f, x)
    plan = autojac.explain(f, x)
    assert plan.tuned and plan.strategy in {s.split("[")[0] for s in plan.timings}
    assert plan.label in plan.timings

    def no_more_planning(*args, **kwargs):
        raise AssertionError("a cached call planned again")

    monkeypatch.setattr(default_planner(), "plan", no_more_planning)
    monkeypatch.setattr(default_planner(), "probes", no_more_planning)
    assert_close(autojac.jacobian(f, x), loop_jacobian(f, x))
    assert autojac.explain(f, x) is plan


def test_a_new_shape_gets_its_own_plan():
    f = mlp(5, 3)
    first = autojac.explain(f, torch.randn(4, 5))
    second = autojac.explain(f, torch.randn(7, 5))
    assert first.key != second.key and second.batch_size == 7


def test_plan_fields_describe_the_problem():
    f, x = MatrixOut().double(), torch.randn(3, 6, dtype=torch.float64)
    plan = autojac.explain(f, x)
    assert isinstance(plan, autojac.Plan)
    assert (plan.op, plan.batch_size, plan.in_shape, plan.out_shape) == ("jacobian", 3, (6,), (2, 3))
    assert (plan.dtype, plan.device, plan.fn_name) == ("float64", "cpu", "MatrixOut")
    assert plan.batch_independent and plan.vmap_ok and plan.deterministic
    assert all(seconds > 0 for seconds in plan.timings.values())
    assert plan.excluded["full_diag"].startswith("not timed")
    assert plan.tuning_seconds > 0 and plan.memory[plan.label] > 0
    assert plan.label in plan.summary()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_with_tuning_off_the_heuristic_chooses_and_nothing_is_timed(how, monkeypatch):
    f, x = mlp(5, 3), torch.randn(4, 5)
    if how == "environment":
        monkeypatch.setenv("AUTOJAC_TUNE", "0")
        result = autojac.jacobian(f, x)
    else:
        result = autojac.jacobian(f, x, tune=False)
    assert_close(result, loop_jacobian(f, x))
    plan = autojac.explain(f, x, tune=False)
    assert not plan.tuned and plan.timings == {} and plan.strategy == "jet_jacobian_rev"  # n=5 > m=3: reverse first
    monkeypatch.delenv("AUTOJAC_TUNE", raising=False)
    assert autojac.explain(f, x).tuned  # tuning on again: the heuristic plan is replaced


def test_a_batch_coupled_function_gets_the_diagonal_blocks():
    x = torch.randn(5, 3, dtype=torch.float64)
    result = autojac.jacobian(centered, x)
    assert_close(result, diagonal_blocks(centered, x))
    plan = autojac.explain(centered, x)
    assert not plan.batch_independent and plan.strategy == "full_diag"


@pytest.mark.parametrize("tune", [True, False], ids=["tuned", "heuristic"])
def test_batchnorm_in_training_mode_is_exact_and_leaves_its_running_stats_as_one_call_would(tune):
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()
    twin = copy.deepcopy(model)
    x = torch.randn(6, 3, dtype=torch.float64)
    result = autojac.jacobian(model, x, tune=tune)
    twin(x)  # what one ordinary forward does to the running statistics
    assert torch.equal(model[1].running_mean, twin[1].running_mean)
    assert torch.equal(model[1].num_batches_tracked, twin[1].num_batches_tracked)
    assert_close(result, diagonal_blocks(copy.deepcopy(twin), x))


def test_dropout_in_training_mode_is_refused_with_advice():
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    with pytest.raises(autojac.NonDeterministicError, match=r"model\.eval\(\)"):
        autojac.jacobian(model, torch.randn(32, 8))
    # ...naming a strategy differentiates one random draw
    assert autojac.jacobian(model, torch.randn(32, 8), strategy="sum_rev").shape == (32, 2, 8)
    model.eval()
    x = torch.randn(32, 8)
    assert_close(autojac.jacobian(model, x), loop_jacobian(model, x))


def test_a_function_that_fails_under_vmap_still_gets_a_correct_answer():
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_close(autojac.jacobian(data_dependent, x), loop_jacobian(data_dependent, x))
    plan = autojac.explain(data_dependent, x)
    assert not plan.vmap_ok and "vmap" in plan.excluded["vmap_rev"]
    with pytest.raises(ValueError, match="cannot be used for this f: it needs f to run under vmap"):
        autojac.jacobian(data_dependent, x, strategy="vmap_fwd")


def test_a_named_strategy_is_used_as_is_and_checked():
    f, x = mlp(5, 3), torch.randn(4, 5)
    expected = loop_jacobian(f, x)
    for label in ["sum_rev", "sum_fwd[chunk=2]", "vmap_rev", "full_diag[chunk=1]", "loop_rev"]:
        assert_close(autojac.jacobian(f, x, strategy=label), expected)
    with pytest.raises(ValueError, match="unknown strategy 'sum-rev' for jacobian; known: full_diag, jet_jacobian_fwd, "
                                         "jet_jacobian_meet, jet_jacobian_rev, loop_rev"):
        autojac.jacobian(f, x, strategy="sum-rev")
    with pytest.raises(ValueError, match="bad chunk '0'"):
        autojac.jacobian(f, x, strategy="sum_rev[chunk=0]")
    with pytest.raises(ValueError, match="needs a batch-independent f.*batch_independent=True"):
        autojac.jacobian(centered, torch.randn(4, 3), strategy="sum_rev")


def test_batch_independent_override_is_trusted():
    x = torch.randn(4, 3, dtype=torch.float64)
    # wrongly asserted: forward and reverse batch tricks then disagree, and the cross-check says so
    with pytest.warns(autojac.AutojacWarning, match="disagrees") as warned:
        plan = autojac.explain(centered, x, batch_independent=True)
    ours = [w for w in warned if issubclass(w.category, autojac.AutojacWarning)]
    assert ours[0].filename == __file__  # the warning points at the caller, not at autojac
    assert plan.batch_independent and plan.strategy != "full_diag"
    assert autojac.explain(mlp(3, 2).double(), x, batch_independent=False).strategy == "full_diag"


@pytest.mark.parametrize("x, error, message", [
    ([[1.0, 2.0]], TypeError, r"x must be a torch.Tensor of shape \(B, \*in\); got list"),
    (torch.tensor(1.0), ValueError, "x is 0-d"),
    (torch.ones(3, 5, dtype=torch.int64), TypeError, "x has dtype torch.int64"),
    (torch.ones(3, 5, dtype=torch.complex64), TypeError, "real floating dtype"),
])
def test_bad_inputs_are_refused(x, error, message):
    with pytest.raises(error, match=message):
        autojac.jacobian(mlp(5, 3), x)


@pytest.mark.parametrize("f, error, message", [
    (lambda x: x[:3].sum(-1, keepdim=True).repeat(1, 10),
     ValueError, r"f returned shape \(3, 10\) for a batch of 4; the first dimension must be the batch size 4"),
    (lambda x: (x, x), TypeError, "f must return one tensor"),
    (lambda x: x.sum(), ValueError, "0-d"),
    (lambda x: x.round().long(), TypeError, "real floating output"),
    ("not callable", TypeError, "f must be callable"),
])
def test_bad_functions_are_refused(f, error, message):
    with pytest.raises(error, match=message):
        autojac.jacobian(f, torch.randn(4, 5))


@pytest.mark.parametrize("options, message", [
    (dict(strategy=None), "strategy must be a string"),
    (dict(create_graph="yes"), "create_graph must be True or False"),
    (dict(tune=1), "tune must be None, True or False"),
    (dict(batch_independent="no"), "batch_independent must be None"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(TypeError, match=message):
        autojac.jacobian(mlp(5, 3), torch.randn(4, 5), **options)


def test_parameters_on_another_device_are_named():
    model = mlp(5, 3).to("meta")
    with pytest.raises(ValueError, match=r"x is on cpu but f's parameter Linear.weight is on meta"):
        autojac.jacobian(model, torch.randn(4, 5))


def test_x_and_its_graph_are_left_untouched():
    f = mlp(5, 3)
    leaf = torch.randn(4, 5, requires_grad=True)
    x = leaf * 2  # part of an outer graph
    result = autojac.jacobian(f, x)
    assert not result.requires_grad and x.requires_grad and x.grad_fn is not None
    assert_close(result, loop_jacobian(f, x.detach()))
    x.sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(leaf, 2.0))
    assert all(p.grad is None for p in f.parameters())
    plain = torch.randn(4, 5)
    autojac.jacobian(f, plain)
    assert not plain.requires_grad


def test_an_empty_batch_gives_an_empty_result_of_the_right_shape():
    result = autojac.jacobian(mlp(5, 3), torch.randn(0, 5))
    assert result.shape == (0, 3, 5)


def test_an_output_that_ignores_x_has_a_zero_jacobian():
    result = autojac.jacobian(lambda x: torch.ones(x.shape[0], 2), torch.randn(3, 4))
    assert torch.equal(result, torch.zeros(3, 2, 4))


def test_tuning_is_logged_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="autojac"):
        autojac.jacobian(mlp(5, 3), torch.randn(4, 5))
    assert any("tuned jacobian of Sequential" in r.getMessage() and "won" in r.getMessage()
               for r in caplog.records)


def test_a_tuned_call_is_served_without_building_the_signature_until_f_changes(monkeypatch):
    from autojac import api

    model, x = mlp(5, 3), torch.randn(4, 5)
    autojac.jacobian(model, x)  # tunes, and remembers the plan for calls that look the same
    built = []
    real = api.signature
    monkeypatch.setattr(api, "signature", lambda *a, **k: built.append(1) or real(*a, **k))
    assert_close(autojac.jacobian(model, x), loop_jacobian(model, x))
    assert_close(autojac.jacobian(model, x.clone()), loop_jacobian(model, x))
    assert built == []
    autojac.jacobian(model, torch.randn(6, 5))  # another batch size: the slow path, a new plan
    assert built == [1]
    model.eval()  # the training flags changed: not served by the shortcut
    autojac.jacobian(model, x)
    assert len(built) == 2
    model[1] = nn.Sigmoid()  # a swapped submodule: a new fingerprint, planned anew
    assert_close(autojac.jacobian(model, x), loop_jacobian(model, x))
    assert len(built) == 3 and autojac.explain(model, x).fingerprint != autojac.explain(mlp(5, 3), x).fingerprint
    autojac.jacobian(model, x)
    before = len(built)
    assert built and autojac.jacobian(model, x) is not None and len(built) == before  # served again
    autojac.clear_cache()  # forgets the shortcuts with the plans
    autojac.jacobian(model, x)
    assert len(built) == before + 1


def test_the_shortcut_checks_its_inputs_like_the_slow_path():
    model, x = mlp(5, 3), torch.randn(4, 5)
    autojac.hvp(model, x, torch.randn_like(x))
    with pytest.raises(ValueError, match="v has shape"):
        autojac.hvp(model, x, torch.randn(4, 6))
    with pytest.raises(TypeError, match="needs v"):
        autojac.hvp(model, x, None)
    with pytest.raises(TypeError, match="create_graph must be True or False"):
        autojac.jacobian(model, x, create_graph=1)
