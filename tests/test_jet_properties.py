"""Property tests of the engine: random compositions of its primitives, against per-sample loops
of torch.autograd (first and second derivatives), in forward, reverse and meet-in-the-middle mode."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from autojac.jet import api, reverse

from helpers import loop_hessian, loop_jacobian

_W = torch.tensor([[0.5, -1.0, 0.3], [0.2, 0.4, -0.7], [-0.6, 0.1, 0.9]], dtype=torch.float64)

UNARY = {
    "tanh": torch.tanh, "sin": torch.sin, "exp": lambda a: torch.exp(0.3 * a), "sigmoid": torch.sigmoid,
    "softplus": F.softplus, "half_square": lambda a: a * a * 0.5, "log1p_square": lambda a: torch.log1p(a * a),
    "sqrt": lambda a: torch.sqrt(a * a + 1), "gelu": F.gelu, "atan": torch.atan, "linear": lambda a: a @ _W,
    "flip": lambda a: a.flip(-1), "roll": lambda a: a.roll(1, -1), "softmax": lambda a: torch.softmax(a, -1),
    "rows": lambda a: a.sum(-1, keepdim=True).expand(-1, 3) * 0.5, "norm": lambda a: F.normalize(a, dim=-1),
    "index": lambda a: a[:, [2, 0, 1]] * a[:, :1], "power": lambda a: (a * a + 0.5) ** 1.5,
}
BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - 2 * b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (1 + b * b), "cat": lambda a, b: torch.cat([a, b], -1)[:, 1:4],
    "matmul": lambda a, b: (a[:, :, None] @ b[:, None, :]).sum(1), "where": lambda a, b: torch.where(a > b, a * b, a - b),
    "einsum": lambda a, b: torch.einsum("bi,bj->bij", a, b).diagonal(dim1=1, dim2=2),
    "maximum": lambda a, b: torch.maximum(a, 0.5 * b),
}

steps = st.lists(
    st.one_of(st.tuples(st.just("unary"), st.sampled_from(sorted(UNARY)), st.integers(0, 20)),
              st.tuples(st.just("binary"), st.sampled_from(sorted(BINARY)), st.integers(0, 20), st.integers(0, 20))),
    min_size=1, max_size=6)


def program(recipe):
    """A per-sample function (B, 3) -> (B, 3): each step applies a primitive to earlier values."""
    def f(x):
        values = [x]
        for step in recipe:
            if step[0] == "unary":
                values.append(UNARY[step[1]](values[step[2] % len(values)]))
            else:
                values.append(BINARY[step[1]](values[step[2] % len(values)], values[step[3] % len(values)]))
        return values[-1]
    return f


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.integers(0, 2**16))
def test_random_compositions_match_autograd(recipe, seed):
    f = program(recipe)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert api.check(f, x) == ""
    jacobian = loop_jacobian(f, x)
    tolerance = dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(api.jacobian(f, x), jacobian, **tolerance)
    torch.testing.assert_close(reverse.reverse_jacobian(f, x), jacobian, **tolerance)
    structure = reverse.analyse(f, x[:2])
    for cut in structure.cuts[:2]:
        torch.testing.assert_close(reverse.meet_jacobian(f, x, cut), jacobian, **tolerance)
    hessian = loop_hessian(f, x)
    out = api.derivatives(f, x, ("value", "jacobian", "hessian"))
    laplacian = hessian.diagonal(dim1=-2, dim2=-1).sum(-1)
    # where autograd's second derivative is NaN (a norm at exactly zero: where(x > x, ...) - x = 0),
    # the engine's is 0 by design (docs/engine.md); compare the rest
    finite = hessian.isfinite()
    torch.testing.assert_close(out["hessian"][finite], hessian[finite], **tolerance)
    torch.testing.assert_close(api.second_order("laplacian", f, x)[laplacian.isfinite()],
                               laplacian[laplacian.isfinite()], **tolerance)
