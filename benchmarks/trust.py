"""No silent wrong answer: an adversarial battery of realistic uses of autojac (issue 15).

Each case is something a demanding PyTorch user does, run through autojac's public API and
compared with an independent reference (see trust_kit.py). Each ends in one outcome: ok, wrong
(with the error size), crash, stale (a plan reused after f changed), retune (tuning again for
nothing), raw-error (torch's raw error, or one that does not say what to change) or
spurious-warning.

    python -m benchmarks.trust                     # every case; writes trust.md and trust.json
    python -m benchmarks.trust --out DIR           # elsewhere (default: a temporary directory)
    python -m benchmarks.trust --only stale        # cases whose name or group contains "stale"
    python -m benchmarks.trust --list              # the cases, without running them

A crashing case never stops the battery. It runs in a few minutes on 2 cores (tuning budget
0.15 s per plan, set with --budget).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

import autojac

from .trust_kit import (OPS, OUTCOMES, Case, Ctx, Finding, Result, call, check_grads, differentiable_reference, env,
                        fd_reference, first_line, mlp, parameter_grads, raised_by_autojac, ref_hessian, ref_jacobian,
                        reference, relative_error, sandbox, standard, strategies_for)

CASES: list[Case] = []


def case(group: str, expected: str, *, name: str | None = None, allow_warnings: bool = False):
    """Register the decorated function as a case of `group`."""
    def register(fn):
        CASES.append(Case(name or fn.__name__.removeprefix("case_"), group, expected, fn, allow_warnings))
        return fn
    return register


def seeded(seed: int = 0):
    torch.manual_seed(seed)


# =================================================================================================
# Grad modes: inference_mode, no_grad, enable_grad, create_graph inside no_grad
# =================================================================================================

def _strategy_case(op: str, strategy: str, mode: str) -> None:
    def run(ctx: Ctx) -> None:
        std = standard()
        manager = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
        with manager:
            result = call(op, *std.args(op), strategy=strategy)
        ctx.check(result, std.refs[op], f"{op} strategy={strategy} under {mode}", second=op != "jacobian")

    CASES.append(Case(f"{mode}-{op}-{strategy}", "grad-mode",
                      f"{op} with strategy={strategy} under torch.{mode}() equals the reference", run))


for _op in OPS:
    for _name in strategies_for(_op):
        _strategy_case(_op, _name, "inference_mode")


def _no_grad_all(op: str) -> None:
    def run(ctx: Ctx) -> None:
        std = standard()
        bad = []
        for name in strategies_for(op):
            with torch.no_grad():
                try:
                    result = call(op, *std.args(op), strategy=name)
                    ctx.check(result, std.refs[op], name, second=op != "jacobian")
                except Finding as finding:
                    bad.append(finding.detail)
                except Exception as error:
                    bad.append(f"{name}: {first_line(error)}")
        if bad:
            raise Finding("wrong", f"{len(bad)} strategies: " + "; ".join(bad)[:400])

    CASES.append(Case(f"no_grad-{op}-every-strategy", "grad-mode",
                      f"every {op} strategy under torch.no_grad() equals the reference", run))


for _op in OPS:
    _no_grad_all(_op)


def _auto_first_call_inference(op: str) -> None:
    def run(ctx: Ctx) -> None:
        std = standard()
        ctx.compare_every_candidate(op)  # which candidates run must not depend on the load
        with torch.inference_mode():
            result = call(op, *std.args(op))
        ctx.check(result, std.refs[op], f"{op} (auto, first call) under inference_mode", second=op != "jacobian")

    CASES.append(Case(f"inference_mode-{op}-auto-first-call", "grad-mode",
                      f"the first {op} call, tuned inside torch.inference_mode(), equals the reference", run))


for _op in OPS:
    _auto_first_call_inference(_op)


@case("grad-mode", "the first call under inference_mode where one call spends the budget (a large model): "
                   "right, not the first candidate's zeros")
def case_inference_mode_budget_spent(ctx: Ctx) -> None:
    seeded()
    model = mlp(4, 1)
    x = torch.randn(6, 4)
    with env(AUTOJAC_TUNE_BUDGET="0.001"), torch.inference_mode():
        result = autojac.jacobian(model, x)
    ctx.check(result, ref_jacobian(model, x), "jacobian (auto) under inference_mode, budget spent by one call")


@case("grad-mode", "a plan tuned outside inference_mode, reused inside, gives the right answer")
def case_inference_mode_reuses_tuned_plan(ctx: Ctx) -> None:
    seeded()
    model = mlp(4, 1)
    x = torch.randn(6, 4)
    expected = ref_jacobian(model, x)
    ctx.check(autojac.jacobian(model, x), expected, "outside")
    autojac.laplacian(model, x)
    expected_laplacian = reference("laplacian", model, x)  # outside: a reference needs autograd too
    with torch.inference_mode():
        ctx.check(autojac.jacobian(model, x), expected, "same plan, inside inference_mode")
        ctx.check(autojac.laplacian(model, x), expected_laplacian, "laplacian inside inference_mode", second=True)


def _create_graph_in_no_grad(op: str) -> None:
    def run(ctx: Ctx) -> None:
        seeded()
        model = mlp(3, 2, width=8)
        x = torch.randn(4, 3)
        v = torch.randn(4, 3)
        params = list(model.parameters())
        args = (model, x, v) if op == "hvp" else (model, x)
        with torch.no_grad():
            result = call(op, *args, create_graph=True)
        if not result.requires_grad or result.grad_fn is None:
            raise Finding("wrong", f"{op}(create_graph=True) inside no_grad returned a result with no graph "
                                   f"(requires_grad={result.requires_grad}, grad_fn={result.grad_fn})")
        expected = differentiable_reference(op, model, x, v)
        ctx.check(result, expected, f"{op} value", second=op != "jacobian")
        got = torch.autograd.grad(result.square().sum(), params, allow_unused=True)
        check_grads(ctx, got, parameter_grads(expected.square().sum(), params),
                    [n for n, _ in model.named_parameters()], f"{op} inside no_grad")

    CASES.append(Case(f"no_grad-create_graph-{op}", "grad-mode",
                      f"{op}(create_graph=True) inside torch.no_grad() is connected to the parameters with "
                      f"correct gradients", run))


for _op in ("jacobian", "laplacian", "hvp"):
    _create_graph_in_no_grad(_op)


@case("grad-mode", "create_graph=True inside torch.inference_mode() raises an error naming inference_mode")
def case_inference_mode_create_graph_refused(ctx: Ctx) -> None:
    std = standard()

    def go():
        with torch.inference_mode():
            result = autojac.jacobian(std.model, std.x, create_graph=True)
        if not result.requires_grad:
            raise Finding("wrong", "returned a result without a graph, silently")
        # A differentiable result would do too, if its gradients are right.
        (g,) = torch.autograd.grad(result.sum(), [std.model[0].weight])
        expected = differentiable_reference("jacobian", std.model, std.x)
        (e,) = torch.autograd.grad(expected.sum(), [std.model[0].weight])
        ctx.check(g, e, "gradient")

    ctx.expect_error(go, ["inference_mode|inference mode"])


@case("grad-mode", "enable_grad() inside no_grad(): plain call equals the reference")
def case_enable_grad_inside_no_grad(ctx: Ctx) -> None:
    std = standard()
    with torch.no_grad(), torch.enable_grad():
        result = autojac.hessian(std.model, std.x)
    ctx.check(result, std.refs["hessian"], "hessian", second=True)


@case("grad-mode", "torch.set_grad_enabled(False) for a whole script: hvp and jacobian are right")
def case_set_grad_enabled_false(ctx: Ctx) -> None:
    std = standard()
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        hv = autojac.hvp(std.model, std.x, std.v)
        jac = autojac.jacobian(std.model, std.x)
    finally:
        torch.set_grad_enabled(previous)
    ctx.check(hv, std.refs["hvp"], "hvp", second=True)
    ctx.check(jac, std.refs["jacobian"], "jacobian")


@case("grad-mode", "x made under inference_mode (an inference tensor) used later: right answer or an "
                   "autojac error naming x")
def case_inference_tensor_x(ctx: Ctx) -> None:
    std = standard()
    with torch.inference_mode():
        x = std.x.clone()
    error = ctx.expect_error(lambda: ctx.check(autojac.jacobian(std.model, x), std.refs["jacobian"], "jacobian"),
                             ["x", "inference"])
    del error  # a clear error is acceptable


@case("grad-mode", "explain() inside inference_mode, then the call: plan made, answer right")
def case_explain_in_inference_mode(ctx: Ctx) -> None:
    std = standard()
    ctx.compare_every_candidate("hessian_diag")
    with torch.inference_mode():
        plan = autojac.explain(std.model, std.x, op="hessian_diag")
        result = autojac.hessian_diag(std.model, std.x)
    if not plan.strategy:
        raise Finding("wrong", "plan without a strategy")
    ctx.check(result, std.refs["hessian_diag"], f"hessian_diag ({plan.strategy})", second=True)


@case("grad-mode", "a coupled f (BatchNorm in training) under no_grad: full_diag's answer, running stats as "
                   "after one forward")
def case_batchnorm_train_no_grad(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    twin = nn.Sequential(*[m for m in __import__("copy").deepcopy(model)])
    expected = ref_jacobian(twin, x, coupled=True)
    twin2 = __import__("copy").deepcopy(model)
    twin2(x)
    with torch.no_grad():
        result = autojac.jacobian(model, x)
    ctx.check(result, expected, "jacobian")
    ctx.check(model[1].running_mean, twin2[1].running_mean, "running_mean after the call")


# =================================================================================================
# x inside the caller's graph; MAML-style non-leaf parameters
# =================================================================================================

def _encoder_decoder(seed: int = 0, n_out: int = 2):
    seeded(seed)
    encoder = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    decoder = mlp(3, n_out, width=8)
    z = torch.randn(5, 4)
    return encoder, decoder, z


def _caller_graph(op: str, create_graph: bool, n_out: int = 2) -> None:
    def run(ctx: Ctx) -> None:
        encoder, decoder, z = _encoder_decoder(n_out=n_out)
        v = torch.randn(5, 3)
        params = list(encoder.parameters()) + list(decoder.parameters())
        names = [f"encoder.{n}" for n, _ in encoder.named_parameters()] + \
                [f"decoder.{n}" for n, _ in decoder.named_parameters()]
        x = torch.tanh(encoder(z))  # part of the caller's graph
        caller_loss = decoder(x).square().sum()
        args = (decoder, x, v) if op == "hvp" else (decoder, x)
        result = call(op, *args, create_graph=create_graph)
        # the reference, on a graph of its own
        x_ref = torch.tanh(encoder(z))
        expected = differentiable_reference(op, decoder, x_ref, v)
        ctx.check(result, expected, f"{op} value", second=op != "jacobian")
        if create_graph:
            got = torch.autograd.grad(result.square().sum(), params, allow_unused=True, retain_graph=True)
            check_grads(ctx, got, parameter_grads(expected.square().sum(), params), names, f"{op} result")
        elif result.requires_grad:
            raise Finding("wrong", "result requires grad without create_graph")
        expected_caller = parameter_grads(decoder(torch.tanh(encoder(z))).square().sum(), params)
        try:
            got_caller = torch.autograd.grad(caller_loss, params)
        except RuntimeError as error:
            raise Finding("crash", f"the caller's own backward afterwards: {first_line(error)}") from None
        check_grads(ctx, got_caller, expected_caller, names, "the caller's own backward afterwards")

    suffix = ("create_graph" if create_graph else "plain") + ("-scalar" if n_out == 1 else "")
    CASES.append(Case(f"caller-graph-{op}-{suffix}", "caller-graph",
                      f"x = tanh(encoder(z)): {op}{'(create_graph=True)' if create_graph else ''} right"
                      f"{', gradients reach encoder and decoder' if create_graph else ''}; the caller's "
                      f"backward works afterwards", run))


for _op in OPS:
    _caller_graph(_op, create_graph=True)
for _op in ("jacobian", "laplacian", "hvp"):
    _caller_graph(_op, create_graph=False)
_caller_graph("laplacian", create_graph=True, n_out=1)


def _maml(op: str, create_graph: bool) -> None:
    def run(ctx: Ctx) -> None:
        seeded()
        model = mlp(3, 1 if op == "laplacian" else 2, width=8)
        params = dict(model.named_parameters())
        xs, ys = torch.randn(6, 3), torch.randn(6, 1 if op == "laplacian" else 2)
        inner = (functional_call(model, params, (xs,)) - ys).square().mean()
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        adapted = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads)}  # non-leaf parameters

        def f(x):
            return functional_call(model, adapted, (x,))

        x = torch.randn(4, 3)
        result = call(op, f, x, create_graph=create_graph)
        expected = differentiable_reference(op, f, x)
        ctx.check(result, expected, f"{op} with adapted parameters", second=op != "jacobian")
        meta = list(params.values())
        if create_graph:
            got = torch.autograd.grad(result.square().sum(), meta, allow_unused=True, retain_graph=True)
            check_grads(ctx, got, parameter_grads(expected.square().sum(), meta), list(params), "meta-gradient")
        # The caller's own meta-loss through the adapted parameters still works afterwards.
        try:
            got = torch.autograd.grad(f(xs).square().mean(), meta)
        except RuntimeError as error:
            raise Finding("crash", f"the caller's meta-backward afterwards: {first_line(error)}") from None
        adapted_ref = {k: p - 0.1 * g for (k, p), g in zip(params.items(), torch.autograd.grad(
            (functional_call(model, params, (xs,)) - ys).square().mean(), meta, create_graph=True))}
        want = torch.autograd.grad(functional_call(model, adapted_ref, (xs,)).square().mean(), meta)
        check_grads(ctx, got, want, list(params), "the caller's meta-backward")

    CASES.append(Case(f"maml-{op}-{'create_graph' if create_graph else 'plain'}", "caller-graph",
                      f"MAML: {op} of functional_call with adapted (non-leaf) parameters"
                      f"{' (create_graph)' if create_graph else ''} is right; meta-gradients flow", run))


_maml("jacobian", True)
_maml("jacobian", False)
_maml("laplacian", True)
_maml("hessian_diag", True)


@case("caller-graph", "x a leaf requiring grad: hessian(create_graph=True) differentiates w.r.t. x correctly")
def case_leaf_x_create_graph_grad_wrt_x(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 1, width=8)
    x = torch.randn(4, 3, requires_grad=True)
    result = autojac.laplacian(model, x, create_graph=True)
    (gx,) = torch.autograd.grad(result.sum(), x)
    expected = differentiable_reference("laplacian", model, x)
    (ex,) = torch.autograd.grad(expected.sum(), x)
    ctx.check(result, expected, "laplacian", second=True)
    ctx.check(gx, ex, "d laplacian / dx", rtol=2e-3)
    if x.grad is not None:
        raise Finding("wrong", "x.grad was written")


@case("caller-graph", "two autojac calls on the same graph-connected x, then the caller's backward")
def case_two_calls_then_backward(ctx: Ctx) -> None:
    encoder, decoder, z = _encoder_decoder()
    x = torch.tanh(encoder(z))
    loss = decoder(x).sum()
    j = autojac.jacobian(decoder, x)
    d = autojac.hessian_diag(decoder, x)
    x_ref = torch.tanh(encoder(z)).detach()
    ctx.check(j, ref_jacobian(decoder, x_ref), "jacobian")
    ctx.check(d, reference("hessian_diag", decoder, x_ref), "hessian_diag", second=True)
    try:
        loss.backward()
    except RuntimeError as error:
        raise Finding("crash", f"the caller's backward: {first_line(error)}") from None
    if encoder[0].weight.grad is None:
        raise Finding("wrong", "the caller's backward did not reach the encoder")


# =================================================================================================
# Plans used without tuning: tune=False, AUTOJAC_TUNE=0, plan files made elsewhere
# =================================================================================================

class LayerNormMLP(nn.Module):
    """(B, n) -> (B, m) with a LayerNorm: PyTorch's nested forward mode through it is wrong."""

    def __init__(self, n: int = 3, m: int = 2, width: int = 8, norm: str = "layer"):
        super().__init__()
        self.inp = nn.Linear(n, width)
        self.norm = {"layer": lambda: nn.LayerNorm(width), "group": lambda: nn.GroupNorm(2, width),
                     "rms": lambda: nn.RMSNorm(width)}[norm]()
        self.out = nn.Linear(width, m)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x))))


def _norm_problem(norm: str = "layer", m: int = 2):
    seeded(3)
    model = LayerNormMLP(norm=norm, m=m)
    # Non-trivial affine parameters, so that the norm's derivatives matter.
    with torch.no_grad():
        for p in model.norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, 3)
    twin = __import__("copy").deepcopy(model).double()
    return model, x, twin


def _untuned_norm(op: str, how: str, norm: str = "layer") -> None:
    def run(ctx: Ctx) -> None:
        model, x, twin = _norm_problem(norm)
        v = torch.randn(4, 3)
        args = (model, x, v) if op == "hvp" else (model, x)
        expected = fd_reference(op, twin, x, v)
        if how == "tune=False":
            result = call(op, *args, tune=False)
            result2 = call(op, *args, tune=False)
        elif how == "AUTOJAC_TUNE=0":
            with env(AUTOJAC_TUNE="0"):
                result = call(op, *args)
                result2 = call(op, *args)
        elif how == "tuned":  # at the default budget, as a user runs it
            with env(AUTOJAC_TUNE_BUDGET="1.0"):
                result = call(op, *args)
            result2 = call(op, *args)
        else:  # one call spends the budget: as for a large model, only the first candidate runs
            with env(AUTOJAC_TUNE_BUDGET="0.001"):
                result = call(op, *args)
            result2 = call(op, *args)
        ctx.check(result, expected, f"{op} ({how}), first call", second=True, dtype=torch.float32)
        ctx.check(result2, expected, f"{op} ({how}), second call", second=True, dtype=torch.float32)

    CASES.append(Case(f"untuned-{norm}norm-{op}-{how.replace('=', '').replace('AUTOJAC_', '').lower()}",
                      "untuned-plan",
                      f"{op} of an MLP with {norm} norm, {how}: equals float64 finite differences "
                      f"(PyTorch's nested forward mode through the norm is wrong)", run,
                      allow_warnings=True))


for _op in ("laplacian", "hessian_diag"):
    for _how in ("tune=False", "AUTOJAC_TUNE=0", "tuned", "budget-spent"):
        _untuned_norm(_op, _how)
for _op in ("hessian", "hvp"):
    for _how in ("tune=False", "tuned"):
        _untuned_norm(_op, _how)
_untuned_norm("laplacian", "tune=False", "group")
_untuned_norm("laplacian", "tune=False", "rms")


class NoGradBlock(nn.Module):
    """(B, 2) -> (B, 6): part of the output is computed under torch.no_grad() (a stop-gradient
    term); reverse mode respects it, forward mode does not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 6)
        self.b = nn.Linear(2, 6)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            target = torch.tanh(self.b(x))
        return torch.tanh(self.a(x)) + 0.5 * target


def _no_grad_block(how: str) -> None:
    def run(ctx: Ctx) -> None:
        seeded()
        model = NoGradBlock()
        x = torch.randn(5, 2)
        expected = ref_jacobian(model, x)
        if how == "tune=False":
            result = autojac.jacobian(model, x, tune=False)
        elif how == "AUTOJAC_TUNE=0":
            with env(AUTOJAC_TUNE="0"):
                result = autojac.jacobian(model, x)
        elif how == "tuned":
            with env(AUTOJAC_TUNE_BUDGET="1.0"):
                result = autojac.jacobian(model, x)
        else:
            with env(AUTOJAC_TUNE_BUDGET="0.001"):
                result = autojac.jacobian(model, x)
        ctx.check(result, expected, f"jacobian ({how})")

    CASES.append(Case(f"untuned-no_grad-block-jacobian-{how.replace('=', '').replace('AUTOJAC_', '').lower()}",
                      "untuned-plan", f"jacobian of an f with a torch.no_grad() block, {how}: equals the "
                                      f"reverse-mode per-sample loop (forward mode ignores no_grad)", run,
                      allow_warnings=True))


for _how in ("tune=False", "AUTOJAC_TUNE=0", "tuned", "budget-spent"):
    _no_grad_block(_how)


@case("untuned-plan", "a heuristic plan warmed with tune=False in CI and shipped (AUTOJAC_PLANS, "
                      "AUTOJAC_REQUIRE_PLAN=1): right answer in production", allow_warnings=True)
def case_shipped_heuristic_plan(ctx: Ctx) -> None:
    model, x, twin = _norm_problem()
    autojac.warm(model, x, ops=("laplacian",), tune=False)
    shipped = ctx.directory / "shipped.json"
    autojac.export_plans(shipped)
    ctx.fresh()  # production: a new process with the shipped file
    with env(AUTOJAC_PLANS=str(shipped), AUTOJAC_REQUIRE_PLAN="1"):
        ctx.fresh()
        result = autojac.laplacian(model, x)
    ctx.check(result, fd_reference("laplacian", twin, x), "laplacian from the shipped plan", second=True,
              dtype=torch.float32)


@case("untuned-plan", "strategy='fwd_fwd_diag' named for a LayerNorm model: right answer or a warning "
                      "(never a silent wrong one)", allow_warnings=True)
def case_forced_wrong_strategy_layernorm(ctx: Ctx) -> None:
    model, x, twin = _norm_problem()
    result = autojac.laplacian(model, x, strategy="fwd_fwd_diag")
    expected = fd_reference("laplacian", twin, x)
    try:
        ctx.check(result, expected, "laplacian", second=True, dtype=torch.float32)
    except Finding:
        if not ctx.autojac_warnings():
            raise


def _force_field() -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """f = -grad E(x) computed with autograd.grad inside f, x, and its Jacobian -Hessian(E)."""
    seeded()
    net = mlp(3, 1, width=8)

    def force(x: Tensor) -> Tensor:
        with torch.enable_grad():
            xr = x if x.requires_grad else x.detach().requires_grad_(True)
            energy = net(xr).sum()
            return -torch.autograd.grad(energy, xr, create_graph=True)[0]

    x = torch.randn(4, 3)
    return force, x, -ref_hessian(net, x)[:, 0]


@case("untuned-plan", "force field f = -grad E(x) computed with autograd.grad inside f, tune=False: the "
                      "Jacobian is -Hessian(E)")
def case_force_field_untuned(ctx: Ctx) -> None:
    force, x, expected = _force_field()
    ctx.check(autojac.jacobian(force, x, tune=False), expected, "jacobian, tune=False", second=True)


@case("untuned-plan", "force field f = -grad E(x), tuned: the Jacobian is -Hessian(E)", allow_warnings=True)
def case_force_field_tuned(ctx: Ctx) -> None:
    force, x, expected = _force_field()
    ctx.check(autojac.jacobian(force, x), expected, "jacobian, tuned", second=True)


# =================================================================================================
# Stale plans: f changes in a way that changes the answer, the key does not see it
# =================================================================================================

def _stale(ctx: Ctx, f, x: Tensor, change, *, op: str = "jacobian", coupled_after: bool = True,
           calls_after: int = 1) -> None:
    """Call op on f (must be right), apply `change`, call again `calls_after` times: the last
    call must be right (and every call from the first right one on). The references are the
    diagonal blocks of the whole-batch derivative, exact whether f mixes samples or not."""
    before = reference(op, f, x, coupled=True)
    ctx.check(call(op, f, x), before, f"{op} before the change", second=op != "jacobian")
    change()
    after = reference(op, f, x, coupled=coupled_after)
    first_right, error = None, math.inf
    for i in range(1, calls_after + 1):
        result = call(op, f, x)
        error = relative_error(result, after)
        right = error <= (2e-3 if op != "jacobian" else 2e-4)
        if right and first_right is None:
            first_right = i
        elif not right and first_right is not None:
            raise Finding("stale", f"right at call {first_right} after the change, wrong again at call {i} "
                                   f"(relative error {error:.2g})")
    if first_right is None:
        raise Finding("stale", f"{calls_after} call(s) after the change still use the old plan: relative error "
                               f"{error:.2g}")


CENTER = False  # a global switch a module's forward reads


class GlobalSwitch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        if CENTER:
            x = x - x.mean(0)
        return torch.tanh(self.lin(x))


@case("stale-plan", "a module whose forward reads a global switch (centering over the batch): right after "
                    "the switch flips")
def case_stale_global_switch(ctx: Ctx) -> None:
    global CENTER
    seeded()
    model = GlobalSwitch()
    x = torch.randn(4, 3)
    CENTER = False

    def flip():
        global CENTER
        CENTER = True

    try:
        _stale(ctx, model, x, flip)
    finally:
        CENTER = False


class ManyAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        for i in range(40):
            setattr(self, f"option_{i}", i % 3 == 0)
        self.center = False

    def forward(self, x: Tensor) -> Tensor:
        if self.center:
            x = x - x.mean(0)
        return torch.tanh(self.lin(x))


@case("stale-plan", "a module with 40+ public attributes whose `center` flag is toggled: right after")
def case_stale_many_attributes(ctx: Ctx) -> None:
    seeded()
    model = ManyAttributes()
    _stale(ctx, model, torch.randn(4, 3), lambda: setattr(model, "center", True))


@case("stale-plan", "two TransformerEncoderLayers differing only in batch_first: each gets its own right "
                    "answer")
def case_stale_transformer_batch_first(ctx: Ctx) -> None:
    seeded()
    first = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    second = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False).eval()
    second.load_state_dict(first.state_dict())
    x = torch.randn(3, 2, 8)
    ctx.check(autojac.jacobian(first, x), ref_jacobian(first, x), "batch_first=True")
    expected = ref_jacobian(second, x, coupled=True)  # dim 0 is the sequence: samples attend to each other
    ctx.check(autojac.jacobian(second, x), expected, "batch_first=False (same shapes)", outcome="stale")


@case("stale-plan", "a monkeypatched forward (model.forward = ...) that mixes samples: right after")
def case_stale_monkeypatched_forward(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 3, width=8)
    original = model.forward

    def patch():
        model.forward = lambda x: original(x - x.mean(0))

    _stale(ctx, model, torch.randn(4, 3), patch)


@case("stale-plan", "two closures with the same code capturing different mixing matrices (identity, dense): "
                    "each right")
def case_stale_closures_capture(ctx: Ctx) -> None:
    seeded()

    def make(mixing: Tensor):
        return lambda x: mixing @ torch.tanh(x)

    x = torch.randn(4, 3)
    f1, f2 = make(torch.eye(4)), make(torch.rand(4, 4))
    ctx.check(autojac.jacobian(f1, x), ref_jacobian(f1, x, coupled=True), "identity mixing")
    ctx.check(autojac.jacobian(f2, x), ref_jacobian(f2, x, coupled=True), "dense mixing", outcome="stale")


@case("stale-plan", "a closure's captured tensor rebound through nonlocal (identity -> dense): right after")
def case_stale_closure_rebound(ctx: Ctx) -> None:
    seeded()
    mixing = torch.eye(4)

    def f(x):
        return mixing @ torch.tanh(x)

    def rebind():
        nonlocal mixing
        mixing = torch.rand(4, 4)

    _stale(ctx, f, torch.randn(4, 3), rebind)


class MixAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.mixing = torch.eye(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.mixing @ torch.tanh(self.lin(x))


@case("stale-plan", "a module attribute tensor swapped for another of the same shape (identity -> dense "
                    "mixing over the batch): right after")
def case_stale_attribute_tensor_swap(ctx: Ctx) -> None:
    seeded()
    model = MixAttribute()
    _stale(ctx, model, torch.randn(4, 3), lambda: setattr(model, "mixing", torch.rand(4, 4)))


class MixBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("mixing", torch.eye(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.mixing @ torch.tanh(self.lin(x))


@case("stale-plan", "a mixing buffer changed in place (identity -> dense; state no key can see): right "
                    "within 64 calls")
def case_stale_buffer_in_place(ctx: Ctx) -> None:
    seeded()
    model = MixBuffer()

    def change():
        with torch.no_grad():
            model.mixing.copy_(torch.rand(4, 4))

    _stale(ctx, model, torch.randn(4, 3), change, calls_after=64)


@case("stale-plan", "Dropout's p raised from 0 in training mode: refused as non-deterministic, as for a "
                    "fresh f (or differentiated consistently)")
def case_stale_dropout_p(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.0), nn.Tanh(), nn.Linear(8, 2)).train()
    x = torch.randn(4, 3)
    ctx.check(autojac.jacobian(model, x), ref_jacobian(model, x), "p=0")
    model[1].p = 0.5
    try:
        autojac.jacobian(model, x)
    except autojac.NonDeterministicError:
        return
    raise Finding("stale", "p=0.5 in training mode served the p=0 plan silently (a fresh f is refused with "
                           "NonDeterministicError)")


class Gate(nn.Module):
    """A learned gate on a batch-mean term: zero at first (batch-independent), coupled once trained."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return h + self.gate * h.mean(0, keepdim=True)


@case("stale-plan", "a learned gate on a batch-mean term, 0 when planned, non-zero after training steps: "
                    "right within 64 calls and from then on")
def case_stale_learned_gate(ctx: Ctx) -> None:
    seeded()
    model = Gate()
    x = torch.randn(8, 3)

    def train():
        with torch.no_grad():
            model.gate.fill_(0.7)

    _stale(ctx, model, x, train, calls_after=64)


class IntMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.mode = 0  # 0: per sample, 1: centered over the batch

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == 1:
            x = x - x.mean(0)
        return torch.tanh(self.lin(x))


@case("stale-plan", "an integer mode attribute (0 -> 1) that switches on centering over the batch: right "
                    "after")
def case_stale_int_mode(ctx: Ctx) -> None:
    seeded()
    model = IntMode()
    _stale(ctx, model, torch.randn(4, 3), lambda: setattr(model, "mode", 1))


class DictConfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.cfg = {"center": False, "scale": 1.0}

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg["center"]:
            x = x - x.mean(0)
        return torch.tanh(self.lin(x)) * self.cfg["scale"]


@case("stale-plan", "a config dict attribute mutated in place ({'center': False} -> True): right after")
def case_stale_dict_config(ctx: Ctx) -> None:
    seeded()
    model = DictConfig()
    _stale(ctx, model, torch.randn(4, 3), lambda: model.cfg.__setitem__("center", True))


@case("stale-plan", "a global function rebound to another model (batch-coupled): right after")
def case_stale_global_rebound(ctx: Ctx) -> None:
    seeded()
    global _SERVED
    _SERVED = mlp(3, 3, width=8)

    def f(x):
        return _SERVED(x)

    def swap():
        global _SERVED
        _SERVED = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

    _stale(ctx, f, torch.randn(4, 3), swap)


_SERVED: nn.Module | None = None


@case("stale-plan", "a forward hook that centers the output over the batch, added after planning: right "
                    "after")
def case_stale_hook_added(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 3, width=8)
    _stale(ctx, model, torch.randn(4, 3),
           lambda: model.register_forward_hook(lambda m, inp, out: out - out.mean(0)))


VMAP_BREAK = False


def vmap_breaker(x: Tensor) -> Tensor:
    if VMAP_BREAK and float(x.detach().abs().max()) > 1e6:  # a Python branch on a value: no vmap
        return x
    return torch.sin(x) * x.sum(-1, keepdim=True)


@case("stale-plan", "a global switch that makes f branch on a value (vmap can no longer run it): right "
                    "after, not a crash")
def case_stale_vmap_breaks(ctx: Ctx) -> None:
    global VMAP_BREAK
    x = torch.randn(70, 3)  # large enough that the heuristic/tuning may pick a vmap strategy
    VMAP_BREAK = False

    def flip():
        global VMAP_BREAK
        VMAP_BREAK = True

    try:
        _stale(ctx, vmap_breaker, x, flip, coupled_after=False)
    finally:
        VMAP_BREAK = False


@case("stale-plan", "model.eval() -> model.train() with BatchNorm (training flags are in the key): right")
def case_stale_train_eval(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).eval()
    x = torch.randn(5, 3)
    ctx.check(autojac.jacobian(model, x), ref_jacobian(model, x), "eval")
    model.train()
    copy = __import__("copy").deepcopy(model)
    ctx.check(autojac.jacobian(model, x), ref_jacobian(copy, x, coupled=True), "train", outcome="stale")


@case("stale-plan", "a submodule swapped (Tanh -> a batch-centering layer): right after")
def case_stale_submodule_swap(ctx: Ctx) -> None:
    seeded()

    class Center(nn.Module):
        def forward(self, x):
            return torch.tanh(x - x.mean(0))

    model = mlp(3, 3, width=8)
    _stale(ctx, model, torch.randn(4, 3), lambda: model.__setitem__(1, Center()))


# =================================================================================================
# Keys that move between processes
# =================================================================================================

_KEY_SCRIPT = textwrap.dedent('''
    import functools, json, sys, torch
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
        if kind in {"tanh", "sigmoid", "softsign", "gelu", "silu", "elu"}:
            return torch.tanh(x)
        return x

    def scaled(x, kind="tanh"):
        return torch.tanh(x) if kind == "tanh" else x

    KINDS = frozenset({"alpha", "beta", "gamma", "delta", "epsilon", "zeta"})

    def frozenset_global(x):
        return torch.tanh(x) if "alpha" in KINDS else x

    class SetAttribute(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.allowed = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta"}
        def forward(self, x):
            return torch.tanh(self.lin(x))

    torch.manual_seed(0)
    x = torch.randn(4, 3)
    fs = {
        "set-literal-forward": SetLiteral(),
        "set-literal-function": set_function,
        "frozenset-global": frozenset_global,
        "set-attribute": SetAttribute(),
        "plain-mlp": nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)),
        "partial-string": functools.partial(scaled, kind="sigmoid"),
    }
    print(json.dumps({name: autojac.explain(f, x, tune=False).key for name, f in fs.items()}))
''')

_KEY_SEEDS = ("1", "2", "3")


@functools.lru_cache(maxsize=1)
def _keys_by_seed(directory: str) -> dict[str, dict[str, str]]:
    Path(directory).mkdir(parents=True, exist_ok=True)
    script = Path(directory) / "trust_keys.py"
    script.write_text(_KEY_SCRIPT)
    found = {}
    for seed in _KEY_SEEDS:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                             env=_child_env(PYTHONHASHSEED=seed, AUTOJAC_CACHE_DIR=str(Path(directory) / f"k{seed}")))
        if out.returncode != 0:
            raise RuntimeError(f"key script failed: {out.stderr.strip().splitlines()[-1] if out.stderr else ''}")
        found[seed] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def _child_env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTOJAC_")}
    source = str(Path(autojac.__file__).resolve().parents[1])
    environ["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
    environ["AUTOJAC_TUNE_BUDGET"] = "0.15"
    environ.update(extra)
    return environ


def _key_case(name: str, description: str) -> None:
    def run(ctx: Ctx) -> None:
        keys = _keys_by_seed(str(ctx.directory.parent / "keys"))
        by_seed = {seed: keys[seed][name] for seed in _KEY_SEEDS}
        if len(set(by_seed.values())) > 1:
            raise Finding("wrong", f"the key moves with PYTHONHASHSEED: {len(set(by_seed.values()))} distinct keys "
                                   f"over seeds {', '.join(_KEY_SEEDS)} (a plan warmed in CI is missing in "
                                   f"production)")

    CASES.append(Case(f"key-hashseed-{name}", "key", f"{description}: the same key under PYTHONHASHSEED "
                                                      f"{', '.join(_KEY_SEEDS)} (subprocesses)", run))


_key_case("set-literal-forward", "a set literal in a module's forward")
_key_case("set-literal-function", "a set literal in a plain function")
_key_case("frozenset-global", "a frozenset global that f reads")
_key_case("set-attribute", "a set attribute of a module")
_key_case("plain-mlp", "a plain nn.Sequential (control)")
_key_case("partial-string", "functools.partial with a string keyword (control)")


_MAIN_SCRIPT = textwrap.dedent('''
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
        torch.manual_seed(0)
        return Net()

    def main():
        model = build()
        x = torch.randn(4, 3)
        try:
            autojac.jacobian(model, x)
        except autojac.PlanRequiredError as error:
            print("MISSING", str(error).splitlines()[0][:200])
            return 3
        print("FOUND")
        return 0

    if __name__ == "__main__":
        sys.exit(main())
''')


def _warm_and_run(ctx: Ctx, run_as: str) -> None:
    work = ctx.directory / "app"
    work.mkdir(exist_ok=True)
    (work / "trustnet.py").write_text(_MAIN_SCRIPT)
    cache = ctx.directory / "ci-cache"
    environ = _child_env(AUTOJAC_CACHE_DIR=str(cache))
    warm = subprocess.run([sys.executable, "-m", "autojac", "warm", "trustnet:build", "--input-shape", "4,3",
                           "--op", "jacobian"], cwd=work, env=environ, capture_output=True, text=True, timeout=180)
    if warm.returncode != 0:
        raise RuntimeError(f"autojac warm failed ({warm.returncode}): {(warm.stderr or warm.stdout).strip()[-300:]}")
    command = ([sys.executable, "trustnet.py"] if run_as == "script"
               else [sys.executable, "-c", "import sys, trustnet; sys.exit(trustnet.main())"])
    ran = subprocess.run(command, cwd=work, env={**environ, "AUTOJAC_REQUIRE_PLAN": "1"}, capture_output=True,
                         text=True, timeout=180)
    if "FOUND" not in ran.stdout:
        detail = ran.stdout.strip() or (ran.stderr.strip().splitlines() or ["?"])[-1]
        raise Finding("wrong", f"the plan warmed by `autojac warm trustnet:build` is not found when run as "
                               f"{run_as}: {detail[:250]}")


@case("key", "a model class defined in a script, warmed by `autojac warm trustnet:build`, then run as "
             "`python trustnet.py` (__main__) with AUTOJAC_REQUIRE_PLAN=1: the plan is found")
def case_key_main_module(ctx: Ctx) -> None:
    _warm_and_run(ctx, "script")


@case("key", "the same, run by importing the module (control): the plan is found")
def case_key_imported_module(ctx: Ctx) -> None:
    _warm_and_run(ctx, "import")


# =================================================================================================
# Odd inputs and contexts
# =================================================================================================

@case("odd-input", "sparse COO x: an autojac error naming x and its sparse layout")
def case_sparse_coo_x(ctx: Ctx) -> None:
    std = standard()
    x = std.x.to_sparse()
    ctx.expect_refusal(lambda: autojac.jacobian(std.model, x), ["x", "sparse"], "a sparse x")


@case("odd-input", "sparse CSR x: an autojac error naming x and its sparse layout")
def case_sparse_csr_x(ctx: Ctx) -> None:
    std = standard()
    x = std.x.to_sparse_csr()
    ctx.expect_refusal(lambda: autojac.hessian(std.model, x), ["x", "sparse"], "a sparse x")


@case("odd-input", "meta-device x with a CPU model: an autojac error naming x and the meta device")
def case_meta_x(ctx: Ctx) -> None:
    std = standard()
    x = torch.empty(4, 3, device="meta")
    ctx.expect_refusal(lambda: autojac.jacobian(std.model, x), ["x", "meta"], "a meta x")


@case("odd-input", "meta-device x with a meta model (shape inference): an autojac error naming meta, or a "
                   "result of the right shape on meta")
def case_meta_x_meta_model(ctx: Ctx) -> None:
    model = mlp(3, 2, width=8).to("meta")
    x = torch.empty(4, 3, device="meta")
    holder = {}

    def go():
        holder["r"] = autojac.jacobian(model, x)

    error = ctx.expect_error(go, ["meta"])
    if error is None and tuple(holder["r"].shape) != (4, 2, 3):
        raise Finding("wrong", f"shape {tuple(holder['r'].shape)}")


@case("odd-input", "autojac.laplacian inside torch.func.grad over the parameters (a PINN trained with "
                   "torch.func): the right gradient, or an autojac error saying what to use instead")
def case_inside_func_grad(ctx: Ctx) -> None:
    seeded()
    model = mlp(2, 1, width=8)
    params = {k: p.detach() for k, p in model.named_parameters()}
    x = torch.rand(6, 2)

    def loss(p):
        return autojac.laplacian(lambda z: functional_call(model, p, (z,)), x, create_graph=True).square().mean()

    def loss_ref(p):
        def u(xi):
            return functional_call(model, p, (xi.unsqueeze(0),))[0, 0]
        lap = torch.func.vmap(lambda xi: torch.func.hessian(u)(xi).trace())(x)
        return lap.square().mean()

    holder = {}
    error = ctx.expect_error(lambda: holder.setdefault("g", torch.func.grad(loss)(params)),
                             ["torch.func|transform", "instead|use"])
    if error is None:
        want = torch.func.grad(loss_ref)(params)
        for k in params:
            ctx.check(holder["g"][k], want[k], f"gradient of {k}", rtol=2e-3)


@case("odd-input", "autojac.jacobian inside torch.func.vmap over an ensemble of batches: the right answer, "
                   "or an autojac error saying what to use instead")
def case_inside_func_vmap(ctx: Ctx) -> None:
    std = standard()
    xs = torch.randn(3, 4, 3)
    holder = {}
    error = ctx.expect_error(lambda: holder.setdefault("j", torch.func.vmap(
        lambda xb: autojac.jacobian(std.model, xb))(xs)), ["torch.func|vmap|transform", "instead|use"])
    if error is None:
        want = torch.stack([ref_jacobian(std.model, xb) for xb in xs])
        ctx.check(holder["j"], want, "jacobian per ensemble member")


@case("odd-input", "d/dx of autojac.laplacian inside torch.func.grad: the right answer, or an autojac error "
                   "saying what to use instead")
def case_inside_func_grad_x(ctx: Ctx) -> None:
    seeded()
    model = mlp(2, 1, width=8)
    x = torch.rand(5, 2)
    holder = {}
    error = ctx.expect_error(
        lambda: holder.setdefault("g", torch.func.grad(lambda xx: autojac.laplacian(model, xx).sum())(x)),
        ["torch.func|transform", "instead|use"])
    if error is None:
        def u(xi):
            return model(xi.unsqueeze(0))[0, 0]
        want = torch.func.grad(lambda xx: torch.func.vmap(lambda xi: torch.func.hessian(u)(xi).trace())(xx).sum())(x)
        ctx.check(holder["g"], want, "gradient w.r.t. x", rtol=2e-3)


@case("odd-input", "torch.autocast on CPU (bfloat16): right to bfloat16 accuracy, no warning, no candidate "
                   "excluded as disagreeing")
def case_autocast_bf16_jacobian(ctx: Ctx) -> None:
    seeded()
    model = mlp(6, 4, width=32)
    x = torch.randn(16, 6)
    expected = ref_jacobian(model, x)
    ctx.compare_every_candidate("jacobian")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = autojac.jacobian(model, x)
        plan = autojac.explain(model, x)
    ctx.check(result, expected, "jacobian under autocast", dtype=torch.bfloat16)
    ctx.no_disagreements(plan)


@case("odd-input", "torch.autocast on CPU (bfloat16), laplacian: right to bfloat16 accuracy, no warning, no "
                   "exclusion")
def case_autocast_bf16_laplacian(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(64, 3)
    expected = reference("laplacian", model, x)
    ctx.compare_every_candidate("laplacian")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = autojac.laplacian(model, x)
        plan = autojac.explain(model, x, op="laplacian")
    ctx.check(result, expected, "laplacian under autocast", dtype=torch.bfloat16, second=True, rtol=0.25)
    ctx.no_disagreements(plan)


@case("odd-input", "float64 x into a float32 model (f casts): right to float32 accuracy, no warning, no "
                   "exclusion")
def case_float64_into_float32(ctx: Ctx) -> None:
    seeded()
    model = mlp(5, 4, width=32)

    def f(x):
        return model(x.float())

    x = torch.randn(32, 5, dtype=torch.float64)
    expected = ref_jacobian(f, x)
    ctx.compare_every_candidate("jacobian")
    result = autojac.jacobian(f, x)
    plan = autojac.explain(f, x)
    ctx.check(result, expected, "jacobian", dtype=torch.float32)
    if result.dtype != torch.float64:
        raise Finding("wrong", f"result dtype {result.dtype}, x's is float64")
    ctx.no_disagreements(plan)


@case("odd-input", "float64 x into a float32 model (f casts), hessian_diag: right, no warning, no exclusion")
def case_float64_into_float32_second(ctx: Ctx) -> None:
    seeded()
    model = mlp(4, 3, width=32)

    def f(x):
        return model(x.float())

    x = torch.randn(32, 4, dtype=torch.float64)
    expected = reference("hessian_diag", f, x)
    ctx.compare_every_candidate("hessian_diag")
    result = autojac.hessian_diag(f, x)
    plan = autojac.explain(f, x, op="hessian_diag")
    ctx.check(result, expected, "hessian_diag", dtype=torch.float32, second=True)
    ctx.no_disagreements(plan)


def _pinn_case(dims: int, batch: int, dtype: torch.dtype) -> None:
    def run(ctx: Ctx) -> None:
        seeded(5)  # weights where float32 strategies differ by up to 3-7x 1e-4 relative (seeds 0-5: 0.2-7x)
        net = nn.Sequential(nn.Linear(dims, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)

        def u(x):
            return (x * (1 - x)).prod(-1, keepdim=True) * net(x)

        x = torch.rand(batch, dims, dtype=dtype)
        ctx.compare_every_candidate("laplacian")
        result = autojac.laplacian(u, x)
        plan = autojac.explain(u, x, op="laplacian")
        twin = __import__("copy").deepcopy(net).double()

        def u64(z):
            return (z * (1 - z)).prod(-1, keepdim=True) * twin(z)

        def one(xi):
            return u64(xi.unsqueeze(0))[0, 0]

        expected = torch.func.vmap(lambda xi: torch.func.hessian(one)(xi).trace())(x.double()).unsqueeze(-1)
        ctx.check(result, expected, "laplacian", dtype=dtype, second=True)
        ctx.no_disagreements(plan)

    CASES.append(Case(f"pinn-hard-constraint-{dims}d-B{batch}-{str(dtype).removeprefix('torch.')}", "odd-input",
                      f"Laplacian of a hard-constraint PINN prod(x(1-x)) * net(x), {dims}-D, B={batch}, "
                      f"{dtype}: right, no warning, no candidate excluded as disagreeing", run))


_pinn_case(1, 2048, torch.float32)
_pinn_case(2, 2048, torch.float32)
_pinn_case(2, 512, torch.float64)


def _low_precision(op: str, dtype: torch.dtype) -> None:
    def run(ctx: Ctx) -> None:
        seeded()
        model32 = mlp(4, 3, width=16)
        model = __import__("copy").deepcopy(model32).to(dtype)
        x = torch.randn(8, 4).to(dtype)
        twin = __import__("copy").deepcopy(model).double()
        expected = reference(op, twin, x.double())
        ctx.compare_every_candidate(op)
        result = call(op, model, x)
        if result.dtype != dtype:
            raise Finding("wrong", f"result dtype {result.dtype}, x's is {dtype}")
        ctx.check(result, expected, op, dtype=dtype, second=op != "jacobian")
        ctx.no_disagreements(autojac.explain(model, x, op=op))

    CASES.append(Case(f"{str(dtype).removeprefix('torch.')}-model-{op}", "odd-input",
                      f"{op} of a {dtype} model at {dtype} x: right to {dtype} accuracy, no warning", run))


for _dtype in (torch.float16, torch.bfloat16):
    _low_precision("jacobian", _dtype)
    _low_precision("laplacian", _dtype)


@case("odd-input", "a transposed (non-contiguous) x: right")
def case_noncontiguous_x(ctx: Ctx) -> None:
    std = standard()
    x = std.x.t().contiguous().t()
    assert not x.is_contiguous() or x.shape[0] == 1
    ctx.check(autojac.hessian(std.model, x), std.refs["hessian"], "hessian", second=True)


@case("odd-input", "x a view with a storage offset into a larger tensor: right, the tensor untouched")
def case_offset_view_x(ctx: Ctx) -> None:
    std = standard()
    big = torch.zeros(7, 5)
    big[2:6, 1:4] = std.x
    before = big.clone()
    x = big[2:6, 1:4]
    ctx.check(autojac.jacobian(std.model, x), std.refs["jacobian"], "jacobian")
    ctx.check(autojac.laplacian(std.model, x), std.refs["laplacian"], "laplacian", second=True)
    if not torch.equal(big, before):
        raise Finding("wrong", "the tensor x is a view of was modified")


@case("odd-input", "an expanded x (stride 0 over the batch): right")
def case_expanded_x(ctx: Ctx) -> None:
    std = standard()
    x = std.x[:1].expand(4, 3)
    expected = ref_jacobian(std.model, x.contiguous())
    ctx.check(autojac.jacobian(std.model, x), expected, "jacobian")
    ctx.check(autojac.hessian_diag(std.model, x), reference("hessian_diag", std.model, x.contiguous()),
              "hessian_diag", second=True)


@case("odd-input", "channels_last x into a conv net: right")
def case_channels_last_x(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    ctx.check(autojac.jacobian(model, x), ref_jacobian(model, x.contiguous()), "jacobian")


@case("odd-input", "x an nn.Parameter: right, x.grad untouched, result detached")
def case_parameter_x(ctx: Ctx) -> None:
    std = standard()
    x = nn.Parameter(std.x.clone())
    result = autojac.jacobian(std.model, x)
    ctx.check(result, std.refs["jacobian"], "jacobian")
    if x.grad is not None or result.requires_grad:
        raise Finding("wrong", f"x.grad={x.grad is not None}, result.requires_grad={result.requires_grad}")


@case("odd-input", "B=1: every operation right")
def case_batch_of_one(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 2, width=8)
    x = torch.randn(1, 3)
    v = torch.randn(1, 3)
    for op in OPS:
        args = (model, x, v) if op == "hvp" else (model, x)
        ctx.check(call(op, *args), reference(op, model, x, v), op, second=op != "jacobian")


@case("odd-input", "B=1, per-sample scalar output, create_graph: hessian right and differentiable")
def case_batch_of_one_scalar_create_graph(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 1, width=8)

    def f(x):
        return model(x).squeeze(-1)

    x = torch.randn(1, 3)
    result = autojac.hessian(f, x, create_graph=True)
    expected = differentiable_reference("hessian", f, x)
    ctx.check(result, expected, "hessian", second=True)
    params = list(model.parameters())
    check_grads(ctx, torch.autograd.grad(result.sum(), params, allow_unused=True),
                parameter_grads(expected.sum(), params), [n for n, _ in model.named_parameters()], "hessian")


@case("odd-input", "torch.compile(model, backend='eager'): right")
def case_compiled_model(ctx: Ctx) -> None:
    std = standard()
    compiled = torch.compile(std.model, backend="eager")
    ctx.check(autojac.jacobian(compiled, std.x), std.refs["jacobian"], "jacobian")


@case("odd-input", "a model using torch.utils.checkpoint (non-reentrant): right")
def case_checkpointed_model(ctx: Ctx) -> None:
    seeded()

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)

    model = Checkpointed()
    x = torch.randn(4, 3)
    ctx.check(autojac.jacobian(model, x), ref_jacobian(model, x), "jacobian")


@case("odd-input", "an LSTM over a sequence: the Jacobian of the last hidden state w.r.t. the sequence is "
                   "right")
def case_lstm(ctx: Ctx) -> None:
    seeded()
    lstm = nn.LSTM(3, 5, batch_first=True)

    def f(x):
        return lstm(x)[0][:, -1]

    x = torch.randn(3, 4, 3)
    ctx.check(autojac.jacobian(f, x), ref_jacobian(f, x), "jacobian", rtol=5e-4)


def _transformer(mode: str) -> None:
    def run(ctx: Ctx) -> None:
        seeded()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
        x = torch.randn(3, 4, 8)
        expected = ref_jacobian(layer, x)
        ctx.compare_every_candidate("jacobian")
        if mode == "inference_mode":
            with torch.inference_mode():
                result = autojac.jacobian(layer, x)
        else:
            result = autojac.jacobian(layer, x)
        ctx.check(result, expected, f"jacobian ({mode})", rtol=5e-4)

    CASES.append(Case(f"transformer-eval-{mode}", "odd-input",
                      f"a TransformerEncoderLayer(batch_first=True) in eval mode, {mode}: right "
                      f"(its fast path runs without grad)", run))


_transformer("normal")
_transformer("inference_mode")


@case("odd-input", "a straight-through estimator (custom autograd.Function, no jvp): the backward's "
                   "derivative, as a reverse-mode loop gives", allow_warnings=True)
def case_straight_through(ctx: Ctx) -> None:
    seeded()

    class RoundSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx_, x):
            return torch.round(x * 4) / 4

        @staticmethod
        def backward(ctx_, grad):
            return grad

    model_in, model_out = nn.Linear(3, 8), nn.Linear(8, 2)

    def f(x):
        return model_out(torch.tanh(RoundSTE.apply(model_in(x))))

    x = torch.randn(4, 3)
    ctx.check(autojac.jacobian(f, x), ref_jacobian(f, x), "jacobian")


@case("odd-input", "weight_norm parametrization: laplacian right")
def case_weight_norm(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 8)), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(4, 3)
    ctx.check(autojac.laplacian(model, x), reference("laplacian", model, x), "laplacian", second=True)


@case("odd-input", "a module with a full backward hook (gradient logging): right, hook fires harmlessly")
def case_backward_hook(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 2, width=8)
    seen = []
    model[0].register_full_backward_hook(lambda m, gi, go: seen.append(1))
    x = torch.randn(4, 3)
    ctx.check(autojac.jacobian(model, x), ref_jacobian(model, x), "jacobian")


@case("odd-input", "a forward hook scaling a layer's output: every operation right (the forward Laplacian "
                   "must not ignore it)")
def case_forward_hook_second_order(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 1, width=8)
    model[1].register_forward_hook(lambda m, inp, out: 2 * out)
    x = torch.randn(4, 3)
    for op in ("laplacian", "hessian"):
        ctx.check(call(op, model, x), reference(op, model, x), op, second=True)


@case("odd-input", "f returns float64 from a float32 x: right, result in x's dtype")
def case_output_upcast(ctx: Ctx) -> None:
    std = standard()

    def f(x):
        return std.model(x).double()

    result = autojac.jacobian(f, std.x)
    ctx.check(result, std.refs["jacobian"], "jacobian")
    if result.dtype != torch.float32:
        raise Finding("wrong", f"result dtype {result.dtype}")


# =================================================================================================
# Cache entries that do not fit
# =================================================================================================

def _rewrite_cache(path: Path, **changes) -> int:
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry.update(changes)
    path.write_text(json.dumps(data))
    return len(data["entries"])


def _entry_case(name: str, expected: str, make, changes: dict, op: str = "jacobian", coupled: bool = False,
                want_warning: bool = True) -> None:
    def run(ctx: Ctx) -> None:
        f, x = make()
        call(op, f, x)  # tuned and stored
        path = autojac.cache_path()
        if path is None or not path.exists():
            raise RuntimeError("no cache file was written")
        _rewrite_cache(path, **changes)
        ctx.fresh(path.parent)  # a new process reading the edited cache
        before = len(ctx.autojac_warnings())
        result = call(op, f, x)
        ctx.check(result, reference(op, f, x, coupled=coupled), op, second=op != "jacobian")
        plan = autojac.explain(f, x, op=op)
        if plan.strategy == changes.get("strategy") and "strategy" in changes:
            raise Finding("wrong", f"the unusable entry ({changes}) is still the plan")
        if want_warning and len(ctx.autojac_warnings()) == before:
            raise Finding("wrong", "no AutojacWarning about the unusable cache entry")

    CASES.append(Case(f"cache-entry-{name}", "cache-entry", expected, run, allow_warnings=True))


def _function_f():
    seeded()
    net = mlp(3, 1, width=8)
    return (lambda x: net(x) * 1.5), torch.randn(4, 3)


def _data_dependent_f():
    def f(x):
        if float(x.detach().abs().max()) > 1e6:
            return x
        return torch.sin(x) * x.sum(-1, keepdim=True)

    return f, torch.randn(4, 3)


def _coupled_f():
    def f(x):
        return torch.tanh(x - x.mean(0)) * x

    return f, torch.randn(4, 3)


def _unfollowable_f():
    seeded()
    net = mlp(3, 1, width=8)
    return (lambda x: torch.cumprod(net(x).repeat(1, 2), 1)[:, -1:]), torch.randn(4, 3)  # no engine rule


_entry_case("engine-strategy-for-an-f-it-cannot-follow",
            "a cache entry naming jet_laplacian for an f with an operation the engine has no rule for (cumprod): "
            "right answer, an AutojacWarning, a new plan", _unfollowable_f, {"strategy": "jet_laplacian", "chunk": None},
            op="laplacian")
_entry_case("vmap-strategy-for-vmap-failing-f",
            "a cache entry naming vmap_rev (vmap_ok true) for an f that cannot run under vmap: right answer, a "
            "warning, a new plan", _data_dependent_f, {"strategy": "vmap_rev", "chunk": None, "vmap_ok": True})
_entry_case("batch-trick-for-coupled-f",
            "a cache entry naming sum_rev (batch_independent true) for a batch-coupled f: right answer, a "
            "warning, a new plan", _coupled_f, {"strategy": "sum_rev", "chunk": None, "batch_independent": True},
            coupled=True)
_entry_case("unknown-strategy",
            "a cache entry naming a strategy this autojac does not know (control): skipped, right answer",
            _function_f, {"strategy": "no_such_strategy"}, op="laplacian", want_warning=False)


# =================================================================================================
# Needless re-tuning (issue 12 item 5) and its controls
# =================================================================================================

def _retune_case(name: str, expected: str, allowed: int, body) -> None:
    def run(ctx: Ctx) -> None:
        body(ctx)
        if ctx.tunings() > allowed:
            raise Finding("retune", f"{ctx.tunings()} tunings (at most {allowed} expected)")

    CASES.append(Case(f"retune-{name}", "retune", expected, run))


def _ode_lambda(ctx: Ctx) -> None:
    seeded()
    net = mlp(3, 3, width=8)

    def dyn(t, z):
        return net(z) * (1.0 + t)

    z = torch.randn(6, 3)
    for t in (0.0, 0.1, 0.25, 0.5, 1.0):
        f = lambda state: dyn(t, state)  # noqa: E731 - what an ODE solver's user writes
        ctx.check(autojac.jacobian(f, z), ref_jacobian(f, z), f"t={t}")


def _ode_partial(ctx: Ctx) -> None:
    seeded()
    net = mlp(3, 3, width=8)

    def dyn(t, z):
        return net(z) * (1.0 + t)

    z = torch.randn(6, 3)
    for t in (0.0, 0.1, 0.25, 0.5, 1.0):
        f = functools.partial(dyn, t)
        ctx.check(autojac.jacobian(f, z), ref_jacobian(f, z), f"t={t}")


class LossHistory(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp(3, 1, width=8)
        self.losses: list[Tensor] = []

    def forward(self, x):
        return self.net(x)


def _loss_list(ctx: Ctx) -> None:
    seeded()
    model = LossHistory()
    x = torch.rand(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(5):
        lap = autojac.laplacian(model, x, create_graph=True)
        loss = lap.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.losses.append(loss.detach())
    ctx.check(autojac.laplacian(model, x, create_graph=True), reference("laplacian", model, x),
              "laplacian after training", second=True)


class Scheduled(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp(3, 2, width=8)
        self.temperature = 1.0
        self.step = 0

    def forward(self, x):
        return self.net(x) / self.temperature


def _schedule(ctx: Ctx) -> None:
    seeded()
    model = Scheduled()
    x = torch.randn(5, 3)
    for step in range(5):
        model.step = step
        model.temperature = 1.0 + 0.1 * step
        ctx.check(autojac.jacobian(model, x), ref_jacobian(model, x), f"step {step}")


def _fresh_tensor_closure(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 2, width=8)
    x = torch.randn(5, 3)
    for step in range(5):
        scale = torch.full((2,), 1.0 + step)

        def f(z, scale=scale):
            return model(z) * scale

        ctx.check(autojac.jacobian(f, x), ref_jacobian(f, x), f"step {step}")


def _new_instances(ctx: Ctx) -> None:
    x = torch.randn(5, 3)
    for seed in range(3):
        seeded(seed)
        model = mlp(3, 2, width=8)
        ctx.check(autojac.jacobian(model, x), ref_jacobian(model, x), f"instance {seed}")


def _train_eval(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.0), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(5, 3)
    for _ in range(3):
        model.train()
        autojac.jacobian(model, x)
        model.eval()
        autojac.jacobian(model, x)


def _optimizer_steps(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 1, width=8)
    x = torch.rand(16, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = autojac.laplacian(model, x, create_graph=True).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ctx.check(autojac.laplacian(model, x, create_graph=True), reference("laplacian", model, x),
              "after Adam steps", second=True)


_retune_case("ode-lambda-t", "an ODE right-hand side lambda z: dyn(t, z) with a new float t per step: tuned "
                             "once over 5 steps, every result right (issue 12 item 5)", 1, _ode_lambda)
_retune_case("ode-partial-t", "functools.partial(dyn, t) with a new float t per step: tuned once over 5 steps, "
                              "right (issue 12 item 5)", 1, _ode_partial)
_retune_case("loss-list", "a module whose training loop appends detached losses to a list attribute: tuned "
                          "once over 5 steps (issue 12 item 5)", 1, _loss_list)
_retune_case("schedule-attributes", "float/int attributes changed every step (temperature, step counter): "
                                    "tuned once (control)", 1, _schedule)
_retune_case("fresh-tensor-default", "a closure made each step with a fresh same-shape tensor default: tuned "
                                     "once, right", 1, _fresh_tensor_closure)
_retune_case("new-instances", "three instances of the same architecture (a sweep): tuned once (weights are "
                              "not in the key)", 1, _new_instances)
_retune_case("train-eval-alternation", "train/eval alternating 3 times: tuned twice (one plan per mode)", 2,
             _train_eval)
_retune_case("optimizer-steps", "5 Adam steps through laplacian(create_graph=True): tuned once, right after",
             1, _optimizer_steps)


# =================================================================================================
# More: second order, coupled f, the forward Laplacian's recognition, create_graph gradients
# =================================================================================================

def _coupled_second(op: str) -> None:
    def run(ctx: Ctx) -> None:
        def f(x):
            return torch.tanh(x - x.mean(0)) * x

        x = torch.randn(4, 3)
        v = torch.randn(4, 3)
        args = (f, x, v) if op == "hvp" else (f, x)
        ctx.check(call(op, *args), reference(op, f, x, v, coupled=True), op, second=op != "jacobian")

    CASES.append(Case(f"coupled-{op}", "more", f"{op} of a batch-coupled f (x - mean over the batch): the "
                                                f"diagonal blocks of the whole-batch derivative", run))


for _op in OPS:
    _coupled_second(_op)


@case("more", "softmax over the batch dimension (coupled): jacobian equals the whole-batch diagonal blocks")
def case_softmax_over_batch(ctx: Ctx) -> None:
    seeded()
    lin = nn.Linear(3, 2)

    def f(x):
        return torch.softmax(lin(x), dim=0)

    x = torch.randn(5, 3)
    ctx.check(autojac.jacobian(f, x), ref_jacobian(f, x, coupled=True), "jacobian")


def _fl_activation(label: str, act, op: str = "laplacian") -> None:
    def run(ctx: Ctx) -> None:
        seeded()
        model = nn.Sequential(nn.Linear(3, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 1))
        x = torch.randn(6, 3)
        v = torch.randn(6, 3)
        args = (model, x, v) if op == "hvp" else (model, x)
        ctx.check(call(op, *args), reference(op, model, x, v), op, second=True)

    CASES.append(Case(f"forward-laplacian-{label}-{op}", "more",
                      f"{op} of a Sequential with {label}: right (the forward Laplacian must use the "
                      f"hyperparameters)", run))


_fl_activation("softplus-beta3", lambda: nn.Softplus(beta=3.0, threshold=5.0))
_fl_activation("softplus-beta3", lambda: nn.Softplus(beta=3.0, threshold=5.0), op="hessian")
_fl_activation("elu-alpha0.5", lambda: nn.ELU(alpha=0.5))
_fl_activation("leaky-relu-0.2", lambda: nn.LeakyReLU(0.2), op="hvp")
_fl_activation("gelu-tanh", lambda: nn.GELU(approximate="tanh"), op="hessian_diag")
_fl_activation("silu", nn.SiLU, op="hvp")


class Residual(nn.Sequential):
    """A Sequential subclass with its own forward: x + layers(x)."""

    def forward(self, x):
        return x[:, :1] + super().forward(x)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class SharpTanh(nn.Tanh):
    def forward(self, x):
        return torch.tanh(3.0 * x)


@case("more", "a Sequential subclass with its own forward (residual): every second-order op right")
def case_sequential_subclass(ctx: Ctx) -> None:
    seeded()
    model = Residual(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.mul_(2)
    x = torch.randn(4, 3)
    for op in ("laplacian", "hessian"):
        ctx.check(call(op, model, x), reference(op, model, x), op, second=True)


@case("more", "a Linear subclass (its own forward) inside a Sequential: laplacian right")
def case_linear_subclass_in_sequential(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(ScaledLinear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(4, 3)
    ctx.check(autojac.laplacian(model, x), reference("laplacian", model, x), "laplacian", second=True)


@case("more", "a Tanh subclass computing tanh(3x) inside a Sequential: laplacian right")
def case_activation_subclass(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.Linear(3, 8), SharpTanh(), nn.Linear(8, 1))
    x = torch.randn(4, 3)
    ctx.check(autojac.laplacian(model, x), reference("laplacian", model, x), "laplacian", second=True)


@case("more", "a forward pre-hook on a child of a Sequential: laplacian right")
def case_child_pre_hook(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 1, width=8)
    model[2].register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    x = torch.randn(4, 3)
    ctx.check(autojac.laplacian(model, x), reference("laplacian", model, x), "laplacian", second=True)


@case("more", "the forward Laplacian after a global module forward hook is registered: right")
def case_global_hook(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 1, width=8)
    x = torch.randn(4, 3)
    ctx.check(autojac.laplacian(model, x), reference("laplacian", model, x), "before", second=True)
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, inp, out: out * 1.5 if isinstance(m, nn.Tanh) else None)
    try:
        ctx.check(autojac.laplacian(model, x), reference("laplacian", model, x), "with a global hook",
                  second=True, outcome="stale")
    finally:
        handle.remove()


@case("more", "jacobian(create_graph=True) of an MLP: gradients of a loss on it reach the parameters "
              "correctly (every jacobian strategy)")
def case_create_graph_every_jacobian_strategy(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 2, width=8)
    x = torch.randn(4, 3)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    expected = differentiable_reference("jacobian", model, x)
    want = parameter_grads(expected.square().sum(), params)
    for name in strategies_for("jacobian"):
        result = autojac.jacobian(model, x, strategy=name, create_graph=True)
        check_grads(ctx, torch.autograd.grad(result.square().sum(), params, allow_unused=True), want, names, name)


@case("more", "an MLP with ReLU: hessian zero, laplacian zero")
def case_relu_second_order(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 2, width=8, act=nn.ReLU)
    x = torch.randn(4, 3)
    for op in ("hessian", "laplacian"):
        result = call(op, model, x)
        if float(result.abs().max()) != 0.0:
            raise Finding("wrong", f"{op} of a ReLU MLP is not zero: max {float(result.abs().max()):.3g}")


@case("more", "outputs of magnitude 1e4 in float32: hessian right, no warning")
def case_large_scale_hessian(ctx: Ctx) -> None:
    seeded()
    model = mlp(3, 2, width=16)
    with torch.no_grad():
        model[-1].weight.mul_(1e4)
    x = torch.randn(8, 3)
    ctx.compare_every_candidate("hessian")
    ctx.check(autojac.hessian(model, x), reference("hessian", model, x), "hessian", second=True)
    ctx.no_disagreements(autojac.explain(model, x, op="hessian"))


@case("more", "hvp with a non-contiguous v: right")
def case_noncontiguous_v(ctx: Ctx) -> None:
    std = standard()
    v = std.v.t().contiguous().t()
    ctx.check(autojac.hvp(std.model, std.x, v), std.refs["hvp"], "hvp", second=True)


@case("more", "hvp(create_graph=True) with v requiring grad (Newton-CG through v): d(Hv)/dv is H")
def case_hvp_grad_wrt_v(ctx: Ctx) -> None:
    std = standard()
    v = std.v.clone().requires_grad_(True)
    w = torch.randn(4, 2, 3)
    result = autojac.hvp(std.model, std.x, v, create_graph=True)
    ctx.check(result, std.refs["hvp"], "hvp", second=True)
    (gv,) = torch.autograd.grad((result * w).sum(), v, allow_unused=True)
    if gv is None:
        raise Finding("wrong", "the result is not connected to v")
    expected = torch.einsum("bkij,bki->bj", std.refs["hessian"], w)
    ctx.check(gv, expected, "d(w . Hv)/dv", second=True)


@case("more", "laplacian of a small conv net on (B, 1, 5, 5) images: right")
def case_conv_laplacian(ctx: Ctx) -> None:
    seeded()
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 1))
    x = torch.randn(2, 1, 5, 5)
    ctx.check(autojac.laplacian(model, x), reference("laplacian", model, x), "laplacian", second=True)


@case("more", "hessian_diag of a matrix-valued output (B, 2, 3): right")
def case_matrix_output_hessian_diag(ctx: Ctx) -> None:
    seeded()
    lin = nn.Linear(4, 6)

    def f(x):
        return torch.sin(lin(x)).view(-1, 2, 3)

    x = torch.randn(3, 4)
    ctx.check(autojac.hessian_diag(f, x), reference("hessian_diag", f, x), "hessian_diag", second=True)


@case("more", "warm() then a call under AUTOJAC_REQUIRE_PLAN=1: no error, no second tuning, right")
def case_warm_then_required(ctx: Ctx) -> None:
    std = standard()
    autojac.warm(std.model, std.x, ops=("jacobian", "laplacian"))
    tuned = ctx.tunings()
    with env(AUTOJAC_REQUIRE_PLAN="1"):
        ctx.check(autojac.jacobian(std.model, std.x), std.refs["jacobian"], "jacobian")
        ctx.check(autojac.laplacian(std.model, std.x), std.refs["laplacian"], "laplacian", second=True)
    if ctx.tunings() != tuned:
        raise Finding("retune", f"{ctx.tunings() - tuned} tunings after warm()")


@case("more", "BatchNorm in training mode: laplacian right (full_hessian) and running stats as after one "
              "forward")
def case_batchnorm_train_laplacian(ctx: Ctx) -> None:
    import copy

    seeded()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    twin = copy.deepcopy(model)
    expected = reference("laplacian", copy.deepcopy(model), x, coupled=True)
    twin(x)
    result = autojac.laplacian(model, x)
    ctx.check(result, expected, "laplacian", second=True)
    ctx.check(model[1].running_var, twin[1].running_var, "running_var")


# =================================================================================================
# Running the battery
# =================================================================================================

class _Timeout(Exception):
    pass


def run_case(c: Case, directory: Path, budget: float, timeout: int) -> Result:
    ctx = Ctx(directory, budget)
    start = time.perf_counter()
    outcome, detail = "ok", ""

    def alarm(signum, frame):
        raise _Timeout(f"no answer within {timeout} s")

    previous = signal.signal(signal.SIGALRM, alarm) if hasattr(signal, "SIGALRM") else None
    try:
        if previous is not None:
            signal.alarm(timeout)
        with sandbox(ctx):
            try:
                c.run(ctx)
            except Finding as finding:
                outcome, detail = finding.outcome, finding.detail
            except _Timeout as error:
                outcome, detail = "crash", f"timeout: {error}"
            except Exception as error:  # a crashing case is an outcome, never the end of the battery
                outcome, detail = "crash", first_line(error)
                if not raised_by_autojac(error):
                    detail += " (raised inside torch)"
            warned = ctx.autojac_warnings()
            if outcome == "ok" and warned and not c.allow_warnings:
                outcome, detail = "spurious-warning", f"{len(warned)} AutojacWarning(s): {warned[0][:200]}"
            elif warned and outcome != "ok":
                detail += f" [{len(warned)} AutojacWarning(s)]"
    except _Timeout as error:
        outcome, detail = "crash", f"timeout: {error}"
    finally:
        if previous is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    return Result(c.name, c.group, c.expected, outcome, detail, time.perf_counter() - start)


def _commit() -> str:
    """The commit of the autojac being tested: the last one that touched its source (+dirty if edited)."""
    root = Path(autojac.__file__).resolve().parents[2]

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        source = git("log", "-1", "--format=%h", "--", "src")
        dirty = git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (source or "unknown") + ("+dirty" if dirty else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(results: list[Result], meta: dict) -> str:
    counts = Counter(r.outcome for r in results)
    groups = sorted({r.group for r in results}, key=[r.group for r in results].index)
    lines = [f"# autojac trust battery ({meta['commit']}, {meta['date']})", "",
             f"{len(results)} cases in {meta['seconds']:.0f} s; torch {meta['torch']}, autojac {meta['autojac']} "
             f"({meta['source']}), {meta['threads']} threads, tuning budget {meta['budget']} s.", "",
             "| outcome | cases |", "|---|---|"]
    lines += [f"| {o} | {counts.get(o, 0)} |" for o in OUTCOMES]
    lines += ["", "| group | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * len(OUTCOMES)]
    for g in groups:
        per = Counter(r.outcome for r in results if r.group == g)
        lines.append(f"| {g} | " + " | ".join(str(per.get(o, 0)) for o in OUTCOMES) + " |")
    failing = [r for r in results if r.outcome != "ok"]
    if failing:
        lines += ["", "## Not ok", ""]
        lines += [f"- **{r.name}** ({r.outcome}): {_cell(r.detail)}" for r in failing]
    lines += ["", "## Every case", "", "| case | group | expected | outcome | s |", "|---|---|---|---|---|"]
    for r in results:
        outcome = r.outcome if r.outcome == "ok" else f"**{r.outcome}**: {_cell(r.detail)}"
        lines.append(f"| {r.name} | {r.group} | {_cell(r.expected)} | {outcome} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trust", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "autojac-trust",
                        help="directory for trust.md and trust.json (default: %(default)s)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only cases whose name or group contains this (repeatable; a regex)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--budget", type=float, default=0.15, help="AUTOJAC_TUNE_BUDGET per plan (seconds)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds before a case counts as a crash")
    args = parser.parse_args(argv)
    chosen = [c for c in CASES if not args.only or any(re.search(p, f"{c.name} {c.group}") for p in args.only)]
    if args.list:
        for c in chosen:
            print(f"{c.group:14} {c.name:60} {c.expected}")
        print(f"{len(chosen)} cases")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="autojac-trust-") as scratch:
        for i, c in enumerate(chosen, 1):
            directory = Path(scratch) / f"{i:03d}"
            directory.mkdir()
            result = run_case(c, directory, args.budget, args.timeout)
            results.append(result)
            mark = "ok" if result.outcome == "ok" else f"{result.outcome.upper()}: {result.detail[:150]}"
            print(f"[{i:3d}/{len(chosen)}] {c.name:55} {result.seconds:5.1f}s {mark}", flush=True)
    meta = {"commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.perf_counter() - started,
            "torch": torch.__version__, "autojac": autojac.__version__,
            "source": str(Path(autojac.__file__).resolve().parent), "threads": torch.get_num_threads(),
            "budget": args.budget, "machine": platform.machine()}
    (args.out / "trust.json").write_text(json.dumps(
        {"meta": meta, "counts": dict(Counter(r.outcome for r in results)),
         "cases": [r.__dict__ for r in results]}, indent=1))
    (args.out / "trust.md").write_text(report(results, meta))
    counts = Counter(r.outcome for r in results)
    print(", ".join(f"{o}: {counts.get(o, 0)}" for o in OUTCOMES))
    print(f"wrote {args.out / 'trust.md'} and {args.out / 'trust.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
