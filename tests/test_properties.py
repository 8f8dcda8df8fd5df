"""Property tests: random per-sample shapes and batch sizes; every valid strategy agrees with a loop."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autojac.probes import run_probes
from autojac.problem import Problem, Sizes
from autojac.strategies import for_op
from autojac.planner import candidates

from helpers import assert_close, loop_jacobian

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


class Mixer(torch.nn.Module):
    """(B, *in) -> (B, *out): a per-sample linear map followed by tanh and a product."""

    def __init__(self, in_shape, out_shape, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.out_shape = out_shape
        n, m = math.prod(in_shape), math.prod(out_shape)
        self.weight = torch.nn.Parameter(torch.randn(m, n, generator=generator, dtype=torch.float64))

    def forward(self, x):
        flat = x.reshape(x.shape[0], -1)
        z = torch.tanh(flat @ self.weight.T) * flat.sum(-1, keepdim=True)
        return z.reshape(x.shape[0], *self.out_shape)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), in_shape=shapes.filter(lambda s: len(s) >= 1), out_shape=shapes,
       seed=st.integers(0, 2**16))
def test_every_valid_strategy_agrees_with_the_loop(batch, in_shape, out_shape, seed):
    f = Mixer(in_shape, out_shape, seed)
    x = torch.randn(batch, *in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = loop_jacobian(f, x)
    probes = run_probes(f, x)
    sizes = Sizes(batch, math.prod(in_shape), math.prod(out_shape), 8, probes.activations)
    pool, _ = candidates("jacobian", sizes, probes, create_graph=False, budget=None)
    assert pool
    for candidate in pool:
        result = candidate.strategy(Problem("jacobian", f, x), candidate.chunk)
        assert result.shape == (batch, *out_shape, *in_shape), candidate.label
        assert_close(result, expected)
    # full_diag is valid for every f (it is only left out of tuning for independent f)
    full = [s for s in for_op("jacobian") if s.name == "full_diag"][0]
    assert_close(full(Problem("jacobian", f, x), 2), expected)
