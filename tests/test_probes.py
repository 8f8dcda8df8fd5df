import pytest
import torch
from torch import nn

from autojac.probes import run_probes

from helpers import centered, data_dependent, mlp


def test_independent_mlp():
    probes = run_probes(mlp(5, 3), torch.randn(6, 5))
    assert probes.batch_independent and probes.vmap_ok and probes.deterministic
    assert probes.out_shape == (3,)
    assert probes.activations > 0


def test_mean_over_batch_is_coupled_and_says_which_samples():
    probes = run_probes(centered, torch.randn(4, 3))
    assert not probes.batch_independent
    assert "sample 0" in probes.coupling and "1, 2, 3" in probes.coupling


def test_batchnorm_in_training_mode_is_coupled_but_eval_mode_is_not():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert not run_probes(model, torch.randn(5, 3)).batch_independent
    model.eval()
    assert run_probes(model, torch.randn(5, 3)).batch_independent


def test_coupling_between_the_last_samples_only_is_found():
    # Output of the last sample mixes in sample 1: seeding sample 0 alone would miss it.
    def f(x):
        mixed = x.clone()
        mixed[-1] = x[-1] + x[1]
        return mixed * 2

    probes = run_probes(f, torch.randn(5, 2))
    assert not probes.batch_independent


def test_softmax_over_the_batch_is_coupled_even_though_a_ones_seed_cancels():
    probes = run_probes(lambda x: torch.softmax(x, dim=0), torch.randn(4, 3))
    assert not probes.batch_independent


def test_single_sample_is_independent_by_definition():
    assert run_probes(centered, torch.randn(1, 3)).batch_independent


def test_override_skips_the_independence_probe():
    assert run_probes(centered, torch.randn(4, 3), batch_independent=True).batch_independent


def test_dropout_in_training_mode_is_not_deterministic():
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 2))
    probes = run_probes(model, torch.randn(16, 8))
    assert not probes.deterministic and "differ" in probes.nondeterminism
    model.eval()
    assert run_probes(model, torch.randn(16, 8)).deterministic


def test_data_dependent_control_flow_fails_under_vmap():
    probes = run_probes(data_dependent, torch.randn(3, 4))
    assert not probes.vmap_ok and probes.vmap_error
    assert probes.batch_independent and probes.deterministic


def test_output_that_ignores_x_is_independent():
    probes = run_probes(lambda x: torch.ones(x.shape[0], 2), torch.randn(3, 4))
    assert probes.batch_independent and probes.out_shape == (2,)


@pytest.mark.parametrize("bad, error", [
    (lambda x: (x, x), TypeError),
    (lambda x: x.sum(), ValueError),
    (lambda x: x[:-1], ValueError),
    (lambda x: x.long(), TypeError),
])
def test_bad_outputs_are_refused(bad, error):
    with pytest.raises(error):
        run_probes(bad, torch.randn(3, 4))


def test_probes_leave_x_alone():
    x = torch.randn(3, 5)
    run_probes(mlp(5, 2), x)
    assert not x.requires_grad and x.grad is None


def test_coupling_between_two_middle_samples_only_is_found():
    # samples 1 and 2 share a term; the first and last samples are independent
    def f(x):
        y = x ** 2
        shared = (x[1:3] ** 2).sum(0, keepdim=True)
        return torch.cat([y[:1], y[1:3] * shared, y[3:]])

    probes = run_probes(f, torch.randn(4, 3))
    assert not probes.batch_independent


@pytest.mark.parametrize("pair", [(200, 301), (5, 6), (64, 320), (510, 511)])
def test_coupling_of_any_one_pair_in_a_large_batch_is_found(pair):
    i, j = pair

    def f(x):
        y = torch.tanh(x)
        return torch.cat([y[:j], y[j:j + 1] + 1e-3 * x[i:i + 1], y[j + 1:]])

    assert not run_probes(f, torch.randn(512, 4)).batch_independent


def test_smoothing_along_the_batch_with_fixed_ends_is_coupled():
    # y[0] and y[-1] pass through: seeding the first or the last sample alone sees nothing
    def f(x):
        return torch.cat([x[:1], (x[:-2] + x[2:]) / 2, x[-1:]])

    assert not run_probes(f, torch.randn(9, 2)).batch_independent


@pytest.mark.parametrize("batch", [2, 3, 17, 64, 257])
def test_independent_functions_stay_independent_at_any_batch(batch):
    model = nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 3)).double()
    assert run_probes(model, torch.randn(batch, 6, dtype=torch.float64)).batch_independent
    assert run_probes(model.float(), torch.randn(batch, 6)).batch_independent


def test_saved_activations_leave_out_parameters_saved_as_views():
    # nn.Linear saves weight.t(), a view of a parameter: it exists anyway and does not grow with
    # the batch or with vectorized passes (it made a 8 -> 256 -> 784 decoder's one sample 815 KB).
    f = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.Tanh(), torch.nn.Linear(256, 784))
    probes = run_probes(f, torch.randn(1, 8))
    weights = sum(p.numel() * 4 for p in f.parameters())
    assert probes.activations < 8 * (8 + 256 + 784) * 4 < weights
