"""The trust battery's machinery: cases, outcomes, a per-case sandbox, and independent references.

A case is a function of a `Ctx` that uses autojac's public API as a user would and compares
what it gets with a reference computed without autojac: an explicit per-sample loop of
torch.autograd, torch.func with vmap, or central differences in float64 where PyTorch's own
higher derivatives are wrong (fused normalizations). It returns normally when autojac behaved,
or raises `Finding` with the outcome and what went wrong; any other exception is a crash.

Outcomes:
    ok                the expected behaviour
    wrong             a result that differs from the reference (the error size is reported)
    crash             an exception where a result was expected (type and first line)
    stale             a plan made for f's old behaviour reused after f changed, with a wrong result
    retune            tuning again where nothing that decides the plan changed
    raw-error         an error was right to raise, but it is torch's raw error or does not name
                      what the user must change
    spurious-warning  a correct result, but an AutojacWarning no one should see
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import autojac

OUTCOMES = ("ok", "wrong", "crash", "stale", "retune", "raw-error", "spurious-warning")
AUTOJAC_DIR = str(Path(autojac.__file__).resolve().parent)
ENV_NAMES = ("AUTOJAC_TUNE", "AUTOJAC_REQUIRE_PLAN", "AUTOJAC_PLANS", "AUTOJAC_CACHE_DIR", "AUTOJAC_TUNE_BUDGET")

# Relative tolerances (of the reference's largest magnitude) by the dtype the computation ran in.
FIRST_ORDER = {torch.float64: 1e-7, torch.float32: 2e-4, torch.float16: 3e-2, torch.bfloat16: 6e-2}
SECOND_ORDER = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 6e-2, torch.bfloat16: 1.2e-1}


class Finding(Exception):
    """What a case found when autojac did not behave: an outcome of OUTCOMES and its detail."""

    def __init__(self, outcome: str, detail: str):
        assert outcome in OUTCOMES, outcome
        super().__init__(f"{outcome}: {detail}")
        self.outcome, self.detail = outcome, detail


@dataclass
class Case:
    name: str
    group: str  # the part of issue 15 (or 12) it belongs to
    expected: str
    run: Callable[[Ctx], None]
    allow_warnings: bool = False  # an AutojacWarning is acceptable here


@dataclass
class Result:
    name: str
    group: str
    expected: str
    outcome: str
    detail: str
    seconds: float


def first_line(error: BaseException) -> str:
    text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    head = text[0] if text else ""
    reasons = getattr(error, "reasons", None)  # NoCandidateError: show a candidate that failed running
    if isinstance(reasons, dict) and reasons:
        failed = [(k, why) for k, why in reasons.items() if not why.startswith(("not timed", "does not apply"))]
        label, why = (failed or list(reasons.items()))[0]
        head = f"{head} {label}: {why}"
    return f"{type(error).__name__}: {head[:300]}"


def raised_by_autojac(error: BaseException) -> bool:
    """Whether the innermost frame of error's traceback is autojac's own code (an autojac message),
    not torch's (a raw error passing through)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(AUTOJAC_DIR)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| over the largest |expected| (inf on a shape mismatch or NaN)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if a.numel() == 0:
        return 0.0
    diff = float((a - e).abs().max())
    if math.isnan(diff):
        return math.inf
    return diff / max(float(e.abs().max()), 1e-6)


class _Tunings(logging.Handler):
    """Counts the planner's INFO records "tuned ..." (one per tuning, as the README documents)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tunings(self) -> int:
        return sum(1 for r in self.records if str(r.msg).startswith("tuned"))


class Ctx:
    """A case's sandbox: its own cache directory and planner, its warnings, its tunings."""

    def __init__(self, directory: Path, budget: float):
        self.directory = directory
        self.budget = budget
        self.caught: list[warnings.WarningMessage] = []
        self.log = _Tunings()
        self._generation = 0  # `sandbox` makes the first planner

    # -- sandbox ------------------------------------------------------------------------------

    def fresh(self, cache: Path | None = None) -> Path:
        """A new process-wide planner over a new (or the given) cache directory: what a new
        process sees. Returns the cache directory."""
        self._generation += 1
        cache = cache or self.directory / f"cache{self._generation}"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["AUTOJAC_CACHE_DIR"] = str(cache)
        from autojac.cache import default_store
        from autojac.planner import Planner, set_default_planner

        set_default_planner(Planner(default_store()))
        return cache

    def compare_every_candidate(self, op: str) -> None:
        """Make tuning of `op` run (and cross-check) every candidate, however busy the machine: a
        clock that advances 0.1 s at each reading, and a budget that buys every candidate's warm-up
        (about six readings each) and little more. For the cases about false disagreements, which
        otherwise depend on how many candidates the load lets run."""
        from autojac.cache import default_store
        from autojac.planner import Planner, set_default_planner
        from autojac.strategies import registry
        from autojac.timing import Clock

        class StepClock(Clock):
            def __init__(self) -> None:
                self.t = 0.0

            def now(self) -> float:
                self.t += 0.1
                return self.t

        os.environ["AUTOJAC_TUNE_BUDGET"] = str(0.6 * len(registry.for_op(op)) + 0.5)
        try:
            set_default_planner(Planner(default_store(), clock=lambda device: StepClock()))
        except TypeError:  # a planner without an injectable clock: the default budget, as a user runs it
            os.environ["AUTOJAC_TUNE_BUDGET"] = "1.0"

    def autojac_warnings(self) -> list[str]:
        return [str(w.message) for w in self.caught if issubclass(w.category, autojac.AutojacWarning)]

    def tunings(self) -> int:
        return self.log.tunings()

    # -- checks -------------------------------------------------------------------------------

    def check(self, actual: Tensor, expected: Tensor, what: str, *, dtype: torch.dtype | None = None,
              second: bool = False, rtol: float | None = None, outcome: str = "wrong") -> float:
        """Raise Finding(outcome) unless actual matches expected; returns the relative error."""
        if not isinstance(actual, Tensor):
            raise Finding(outcome, f"{what}: got {type(actual).__name__}, not a tensor")
        dtype = dtype or expected.dtype
        allowed = rtol if rtol is not None else (SECOND_ORDER if second else FIRST_ORDER).get(dtype, 2e-4)
        error = relative_error(actual, expected)
        if not error <= allowed:
            shape = "" if tuple(actual.shape) == tuple(expected.shape) else (
                f" (shape {tuple(actual.shape)}, expected {tuple(expected.shape)})")
            raise Finding(outcome, f"{what}: relative error {error:.2g} (allowed {allowed:.1g}){shape}")
        return error

    def expect_error(self, call: Callable[[], object], words: Sequence[str], *,
                     types: tuple[type[BaseException], ...] = (ValueError, TypeError, autojac.AutojacError),
                     ) -> BaseException | None:
        """Run call; if it raises, the error must be autojac's own, of one of `types`, naming every
        one of `words` (case-insensitive; alternatives separated by |), else Finding(raw-error).
        Returns the error, or None if call returned normally (the case judges that)."""
        try:
            call()
        except Finding:
            raise
        except Exception as error:  # judged below
            text = str(error).lower()
            missing = [w for w in words if not any(alt.lower() in text for alt in w.split("|"))]
            if not isinstance(error, types) or not raised_by_autojac(error) or missing:
                why = []
                if not raised_by_autojac(error):
                    why.append("raised inside torch, not by autojac")
                if missing:
                    why.append(f"does not name {', '.join(missing)}")
                if not isinstance(error, types):
                    why.append(f"not a {'/'.join(t.__name__ for t in types)}")
                raise Finding("raw-error", f"{first_line(error)} ({'; '.join(why)})") from None
            return error
        return None

    def expect_refusal(self, call: Callable[[], object], words: Sequence[str], what: str) -> None:
        """`call` must be refused with autojac's own error naming `words` (expect_error); returning
        normally is Finding(wrong): `what` was accepted silently."""
        if self.expect_error(call, words) is None:
            raise Finding("wrong", f"{what} was accepted silently")

    def no_disagreements(self, plan: autojac.Plan) -> None:
        """Raise Finding(spurious-warning) if the plan excluded a candidate for disagreeing."""
        bad = {label: why for label, why in plan.excluded.items() if "disagree" in why}
        if bad:
            label, why = next(iter(bad.items()))
            raise Finding("spurious-warning", f"{len(bad)} candidate(s) excluded as disagreeing, e.g. "
                                              f"{label}: {why[:160]}")


@contextlib.contextmanager
def sandbox(ctx: Ctx) -> Iterator[None]:
    """Environment, logging and warnings of one case, restored afterwards."""
    saved = {name: os.environ.get(name) for name in ENV_NAMES}
    os.environ["AUTOJAC_TUNE_BUDGET"] = str(ctx.budget)
    for name in ("AUTOJAC_TUNE", "AUTOJAC_REQUIRE_PLAN", "AUTOJAC_PLANS"):
        os.environ.pop(name, None)
    logger = logging.getLogger("autojac")
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(ctx.log)
    grad_enabled = torch.is_grad_enabled()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctx.caught = caught
            ctx.fresh()
            yield
    finally:
        torch.set_grad_enabled(grad_enabled)
        logger.removeHandler(ctx.log)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- independent references ----------------------------------------------------------------------
# None of these uses autojac; all run in normal grad mode whatever the case is doing.

def _sample_fn(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def ref_jacobian(f: Callable[[Tensor], Tensor], x: Tensor, *, coupled: bool = False) -> Tensor:
    """(B, *out, *in): a loop of torch.autograd.functional.jacobian over the samples; with
    `coupled`, the diagonal blocks of the whole-batch Jacobian."""
    x = x.detach()
    with torch.enable_grad():
        if coupled:
            full = torch.autograd.functional.jacobian(f, x)  # (B, *out, B, *in)
            out_dims = full.dim() - x.dim() - 1  # *out
            return torch.stack([full.select(out_dims + 1, b)[b] for b in range(x.shape[0])])
        return torch.stack([torch.autograd.functional.jacobian(_sample_fn(f), x[b]) for b in range(x.shape[0])])


def ref_hessian(f: Callable[[Tensor], Tensor], x: Tensor, *, coupled: bool = False) -> Tensor:
    """(B, *out, *in, *in): per sample and output element, torch.autograd.functional.hessian
    (double backward); with `coupled`, the diagonal blocks of the whole-batch Hessians."""
    x = x.detach()
    batch, in_shape = x.shape[0], tuple(x.shape[1:])
    with torch.enable_grad():
        out_shape = tuple(f(x).shape[1:])
        m = max(1, math.prod(out_shape))
        blocks = []
        for b in range(batch):
            rows = []
            for k in range(m):
                if coupled:
                    full = torch.autograd.functional.hessian(lambda z: f(z)[b].reshape(-1)[k], x)
                    rows.append(full[b].select(len(in_shape), b))
                else:
                    rows.append(torch.autograd.functional.hessian(lambda xi: f(xi.unsqueeze(0)).reshape(-1)[k], x[b]))
            blocks.append(torch.stack(rows).reshape(*out_shape, *in_shape, *in_shape))
    return torch.stack(blocks)


def fd_hessian(f64: Callable[[Tensor], Tensor], x: Tensor, step: float = 1e-5) -> Tensor:
    """(B, *out, *in, *in) by central differences of the reverse-mode per-sample Jacobian, in
    float64: for fused normalizations, whose higher derivatives PyTorch gets wrong."""
    x = x.detach().to(torch.float64)
    in_shape, n = tuple(x.shape[1:]), math.prod(x.shape[1:])
    columns = []
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64).reshape(in_shape)
        e.view(-1)[i] = step
        plus, minus = ref_jacobian(f64, x + e), ref_jacobian(f64, x - e)
        columns.append((plus - minus) / (2 * step))  # (B, *out, *in): d/dx_i of each Jacobian row
    stacked = torch.stack(columns, -1)  # (B, *out, *in, n)
    return stacked.reshape(*stacked.shape[:-1], *in_shape)


def from_hessian(op: str, hessian: Tensor, in_shape: tuple[int, ...], v: Tensor | None = None) -> Tensor:
    """What `op` gives, from per-sample Hessians (B, *out, *in, *in)."""
    n = math.prod(in_shape)
    lead = hessian.shape[: hessian.dim() - 2 * len(in_shape)]
    square = hessian.reshape(*lead, n, n)
    if op == "hessian":
        return hessian
    if op == "hvp":
        assert v is not None
        flat = v.reshape(v.shape[0], *(1,) * (len(lead) - 1), n, 1).to(square.dtype)
        return (square @ flat).reshape(*lead, *in_shape)
    diag = square.diagonal(dim1=-2, dim2=-1)
    return diag.reshape(*lead, *in_shape) if op == "hessian_diag" else diag.sum(-1)


def reference(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None = None, *,
              coupled: bool = False) -> Tensor:
    if op == "jacobian":
        return ref_jacobian(f, x, coupled=coupled)
    return from_hessian(op, ref_hessian(f, x, coupled=coupled), tuple(x.shape[1:]), v)


def fd_reference(op: str, f64: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None = None) -> Tensor:
    if op == "jacobian":
        return ref_jacobian(f64, x.to(torch.float64))
    return from_hessian(op, fd_hessian(f64, x), tuple(x.shape[1:]), None if v is None else v.to(torch.float64))


def differentiable_reference(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor | None = None) -> Tensor:
    """The result of op, differentiable w.r.t. f's parameters and (if it requires grad) x, by an
    explicit loop of torch.autograd.grad(create_graph=True) over samples and entries."""
    with torch.enable_grad():
        results = []
        for b in range(x.shape[0]):
            xb = x[b:b + 1] if x.requires_grad else x[b:b + 1].detach().requires_grad_(True)
            y = f(xb).reshape(-1)
            per_output = []
            for k in range(y.numel()):
                (g,) = torch.autograd.grad(y[k], xb, create_graph=True)
                g = g.reshape(-1)
                if op == "jacobian":
                    per_output.append(g)
                    continue
                rows = [torch.autograd.grad(g[i], xb, create_graph=True, allow_unused=True)[0] for i in range(g.numel())]
                rows = [torch.zeros_like(xb) if r is None else r for r in rows]
                hess = torch.stack([r.reshape(-1) for r in rows])  # (n, n)
                if op == "hessian":
                    per_output.append(hess.reshape(-1))
                elif op == "hvp":
                    per_output.append(hess @ v[b].reshape(-1))
                elif op == "hessian_diag":
                    per_output.append(hess.diagonal())
                else:
                    per_output.append(hess.diagonal().sum().reshape(1))
            results.append(torch.stack(per_output))
    out = torch.stack(results)  # (B, m, tail)
    in_shape = tuple(x.shape[1:])
    out_shape = tuple(f(x[:1].detach()).shape[1:])
    tails = {"jacobian": in_shape, "hvp": in_shape, "hessian_diag": in_shape, "hessian": in_shape + in_shape,
             "laplacian": ()}
    return out.reshape(x.shape[0], *out_shape, *tails[op])


def parameter_grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    # the graph is kept: it may run through the caller's (MAML's adapted parameters), used again after
    grads = torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def check_grads(ctx: Ctx, got: Sequence[Tensor | None], expected: Sequence[Tensor], names: Sequence[str],
                what: str, rtol: float = 2e-3) -> None:
    """Gradients reached every parameter and match the reference's."""
    for g, e, name in zip(got, expected, names):
        if g is None and float(e.abs().max()) == 0.0:
            continue  # autograd's None for a parameter the result does not depend on (a last bias)
        if g is None:
            raise Finding("wrong", f"{what}: no gradient reached {name} (expected norm {float(e.norm()):.3g})")
        ctx.check(g, e, f"{what}: gradient of {name}", rtol=rtol)


# -- models --------------------------------------------------------------------------------------

def mlp(n_in: int = 3, n_out: int = 2, width: int = 16, depth: int = 2, act: Callable[[], nn.Module] = nn.Tanh,
        dtype: torch.dtype = torch.float32) -> nn.Sequential:
    layers: list[nn.Module] = []
    sizes = [n_in] + [width] * depth
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(sizes[-1], n_out))
    return nn.Sequential(*layers).to(dtype)


@dataclass
class Standard:
    """The tanh MLP 3 -> 2 at B=4 with every operation's reference, shared by many cases."""

    model: nn.Sequential
    x: Tensor
    v: Tensor
    refs: dict[str, Tensor] = field(default_factory=dict)

    def args(self, op: str) -> tuple:
        return (self.model, self.x, self.v) if op == "hvp" else (self.model, self.x)


_STANDARD: Standard | None = None


def standard() -> Standard:
    global _STANDARD
    if _STANDARD is None:
        generator = torch.Generator().manual_seed(1234)
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            model = mlp(3, 2, width=8)
        x = torch.randn(4, 3, generator=generator)
        v = torch.randn(4, 3, generator=generator)
        std = Standard(model, x, v)
        hess = ref_hessian(model, x)
        std.refs["jacobian"] = ref_jacobian(model, x)
        for op in ("hessian", "hvp", "hessian_diag", "laplacian"):
            std.refs[op] = from_hessian(op, hess, (3,), v)
        _STANDARD = std
    return _STANDARD


def call(op: str, *args, **kwargs) -> Tensor:
    return getattr(autojac, op)(*args, **kwargs)


def strategies_for(op: str) -> list[str]:
    from autojac.strategies import registry

    return [s.name for s in registry.for_op(op)]


OPS = ("jacobian", "hessian", "hvp", "hessian_diag", "laplacian")
