"""Every rule of the engine's table, on its own examples, against torch.func (or, for the rules
whose higher derivatives PyTorch gets wrong, against finite differences of first derivatives).
Parametrized over the table itself: a rule is tested the moment it is added."""

import pytest
import torch

from autojac.jet import RULES, TABLE, api, reverse
from autojac.jet.interpreter import Interpreter, run
from autojac.jet.order import Order

from helpers import loop_hessian, loop_jacobian

CASES = [(rule, i) for rule in TABLE.values() for i in range(len(rule.examples))]


def reference_hessian(fn, x, exact):
    """(B, *out, n, n) per-sample Hessians: double backward per sample, or central differences of
    first derivatives where PyTorch's own higher derivatives are wrong."""
    n = x[0].numel()
    if exact:
        h = loop_hessian(fn, x)
        return h.reshape(*h.shape[: h.dim() - 2 * (x.dim() - 1)], n, n)
    step = 1e-5
    columns = []
    for j in range(n):
        e = torch.zeros(x.shape[0], n, dtype=x.dtype)
        e[:, j] = step
        up, down = loop_jacobian(fn, x + e.view_as(x)), loop_jacobian(fn, x - e.view_as(x))
        columns.append(((up - down) / (2 * step)).reshape(*up.shape[: up.dim() - (x.dim() - 1)], n))
    return torch.stack(columns, -1)


def _input(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 0.8 * torch.randn(2, *shape, generator=generator, dtype=torch.float64) + 0.1


def test_every_rule_has_examples_and_every_entry_a_rule():
    assert all(rule.examples for rule in TABLE.values()), [r.name for r in TABLE.values() if not r.examples]
    assert set(RULES.values()) <= set(TABLE.values())
    assert {rule.family for rule in TABLE.values()} == {"zero", "linear", "deriv", "bilinear", "composite", "rule"} - {"rule"}


@pytest.mark.parametrize("rule, index", CASES, ids=[f"{r.name}-{i}" for r, i in CASES])
def test_rule_matches_the_reference(rule, index):
    example = rule.examples[index]
    x = _input(example.in_shape)
    n = x[0].numel()
    in_shape = tuple(x.shape[1:])
    v = _input(example.in_shape, seed=1)
    # the example does exercise its rule
    interpreter = Interpreter(Order("first", 1))
    interpreter.seen = set()
    y, _ = run(example.fn, x, interpreter, api.basis(0, 1, x))
    assert rule.name in interpreter.seen, f"example {index} of {rule.name} never applies it: {interpreter.seen}"
    torch.testing.assert_close(y, example.fn(x))

    out = api.derivatives(example.fn, x, ("value", "jacobian", "hessian"))
    tolerance = dict(rtol=1e-9, atol=1e-10) if example.exact else dict(rtol=1e-5, atol=1e-6)
    if example.tolerance is not None:
        tolerance = dict(rtol=example.tolerance, atol=example.tolerance)
    torch.testing.assert_close(out["jacobian"], loop_jacobian(example.fn, x), **tolerance)
    h = reference_hessian(example.fn, x, example.exact)
    lead = h.shape[:-2]
    torch.testing.assert_close(out["hessian"].reshape(*lead, n, n), h, **tolerance)
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(api.second_order("hessian_diag", example.fn, x).reshape(*lead, n), diagonal, **tolerance)
    with torch.no_grad():  # without autograd the rules work in place where they can
        torch.testing.assert_close(api.second_order("hessian_diag", example.fn, x).reshape(*lead, n), diagonal,
                                   **tolerance)
        torch.testing.assert_close(api.second_order("laplacian", example.fn, x), diagonal.sum(-1), **tolerance)
    hv = (h @ v.reshape(2, *(1,) * (h.dim() - 3), n, 1)).squeeze(-1)
    torch.testing.assert_close(api.second_order("hvp", example.fn, x, v).reshape(*lead, n), hv, **tolerance)


@pytest.mark.parametrize("grad_mode", [False, True])
def test_a_constant_second_derivative_on_a_carried_second_order_stack(grad_mode):
    # torch.square declares its second derivative as the number 2; on an input that already carries
    # a second-order stack (sin(x) does) it once reached torch.addcmul as a float and the engine gave up
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda z: torch.square(torch.sin(z)).sum(-1)  # noqa: E731
    with torch.set_grad_enabled(grad_mode):
        laplacian = api.second_order("laplacian", f, x, None, None)
    expected = loop_hessian(f, x).diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(laplacian, expected)


@pytest.mark.parametrize("rule, index", CASES, ids=[f"{r.name}-{i}" for r, i in CASES])
def test_rule_matches_the_reference_in_reverse_mode(rule, index):
    # the rule's maps transposed (reverse mode, meeting in the middle at every cut) and its own
    # second-order terms weighted by adjoints (jet_fwd_rev), where f's values hold the batch
    example = rule.examples[index]
    x = _input(example.in_shape)
    n = x[0].numel()
    tolerance = dict(rtol=1e-9, atol=1e-10) if example.exact else dict(rtol=1e-5, atol=1e-6)
    if example.tolerance is not None:
        tolerance = dict(rtol=example.tolerance, atol=example.tolerance)
    jacobian = loop_jacobian(example.fn, x)
    torch.testing.assert_close(reverse.reverse_jacobian(example.fn, x), jacobian, **tolerance)
    structure = reverse.analyse(example.fn, x)
    for cut in structure.cuts:
        torch.testing.assert_close(reverse.meet_jacobian(example.fn, x, cut), jacobian, **tolerance)
    h = reference_hessian(example.fn, x, example.exact)
    lead = h.shape[:-2]
    hessian = reverse.second_order_by_adjoints("hessian", example.fn, x, layout=structure.layout)
    torch.testing.assert_close(hessian.reshape(*lead, n, n), h, **tolerance)
