"""The structure-aware engine against what people write by hand.

    python -m benchmarks.pinn [--out DIR] [--quick] [--only pinn|jacobian] [--threads N]

1. Physics-informed networks (wrapped Sequential, hard boundary constraint, Fourier features,
   residual blocks, SIREN, a network of (x, t)), n inputs from 2 to 50, B in {256, 4096}:
   the Laplacian and the Hessian diagonal by the engine (`jet_laplacian` and `jet_fwd_rev`, each
   called directly: registry.get(name)(problem)), by autojac after tuning, and by the hand-written nested autograd a PINN user writes (one backward
   for the gradient with create_graph=True, then one backward per input coordinate). Each twice:
   the result alone, and with create_graph=True plus a backward pass of a scalar loss into the
   parameters (a training step).
2. Jacobians: the FLOP/s of the engine on a 512 -> 64 -> 64 -> 512 tanh MLP at B=512 (only the
   FLOPs of the cheapest order of the chain W3 D2 W2 D1 W1 counted), against this machine's f32
   matmul FLOP/s measured in the same run; and the engine and autojac against vmap(jacrev) on
   docs/design.md's 27 shapes (B in {1, 32, 512}, in in {2, 64, 512}, out in {1, 64, 512}, two hidden
   layers of 64).

Every contender of a case is timed side by side, interleaved (autojac.timing.compare), and the
tables give ratios within a case. The run records the machine, torch's version, the date and the
load average before and after: timings taken while other processes compete are not final.
Results go to DIR (default: a new temporary directory): pinn-DATE.json and pinn-DATE.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import autojac
from autojac.problem import Problem
from autojac.strategies import registry
from autojac.timing import compare

from .machine import busy_note, load_average, matmul_flops

WIDTH = 64
ENGINE = ("jet_laplacian", "jet_fwd_rev")  # the engine's two forms of second order


# ---------------------------------------------------------------------------------------------
# The physics-informed networks: u(x) for x of shape (B, n), one output per sample (B, 1)

def _mlp(n_in: int, n_out: int = 1, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, WIDTH), activation(), nn.Linear(WIDTH, WIDTH), activation(),
                         nn.Linear(WIDTH, n_out))


class Wrapped(nn.Module):
    """The usual PINN class: a module holding the Sequential."""

    def __init__(self, n: int):
        super().__init__()
        self.net = _mlp(n)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class HardConstraint(nn.Module):
    """u = prod_i x_i (1 - x_i) * net(x): zero on the faces of the unit box."""

    def __init__(self, n: int):
        super().__init__()
        self.net = _mlp(n)

    def forward(self, x: Tensor) -> Tensor:
        return (x * (1 - x)).prod(-1, keepdim=True) * self.net(x)


class Fourier(nn.Module):
    """Random Fourier features [sin(2 pi x B), cos(2 pi x B)] into an MLP."""

    def __init__(self, n: int, features: int = 32):
        super().__init__()
        self.register_buffer("freq", torch.randn(n, features))
        self.net = _mlp(2 * features)

    def forward(self, x: Tensor) -> Tensor:
        z = 2 * math.pi * x @ self.freq
        return self.net(torch.cat([torch.sin(z), torch.cos(z)], -1))


class Residual(nn.Module):
    """A lifting layer, two residual blocks h + tanh(W h + b), a linear head."""

    def __init__(self, n: int):
        super().__init__()
        self.lift = nn.Linear(n, WIDTH)
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lift(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


class Siren(nn.Module):
    """Sine activations sin(w0 (W h + b)) (Sitzmann et al. 2020)."""

    def __init__(self, n: int, w0: float = 30.0):
        super().__init__()
        self.w0 = w0
        self.layers = nn.ModuleList([nn.Linear(n, WIDTH), nn.Linear(WIDTH, WIDTH)])
        self.head = nn.Linear(WIDTH, 1)
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                bound = 1 / n if i == 0 else math.sqrt(6 / WIDTH) / w0
                layer.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.layers:
            h = torch.sin(self.w0 * layer(h))
        return self.head(h)


class SpaceTime(nn.Module):
    """u(x, t): a module of two inputs, called through a lambda on x = [space, time]."""

    def __init__(self, n: int):
        super().__init__()
        self.net = _mlp(n)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t], dim=1))


def space_time(n: int) -> Callable[[Tensor], Tensor]:
    net = SpaceTime(n)
    f = lambda xt: net(xt[:, :-1], xt[:, -1:])  # noqa: E731
    f.module = net  # type: ignore[attr-defined]  (the parameters, for the backward pass)
    return f


MODELS: dict[str, Callable[[int], Callable[[Tensor], Tensor]]] = {
    "wrapped": Wrapped, "hard_constraint": HardConstraint, "fourier": Fourier, "residual": Residual,
    "siren": Siren, "space_time": space_time,
}


def parameters(f: Callable[[Tensor], Tensor]) -> list[Tensor]:
    module = f if isinstance(f, nn.Module) else f.module  # type: ignore[attr-defined]
    return list(module.parameters())


# ---------------------------------------------------------------------------------------------
# The hand-written nested autograd

def nested(op: str, f: Callable[[Tensor], Tensor], x: Tensor, create_graph: bool) -> Tensor:
    """What a PINN user writes: the gradient with create_graph, then one backward per coordinate."""
    x = x.detach().requires_grad_(True)
    u = f(x)
    (grad,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    columns = [torch.autograd.grad(grad[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0][:, i]
               for i in range(x.shape[1])]
    if op == "laplacian":
        total = columns[0]
        for column in columns[1:]:
            total = total + column
        return total[:, None]
    return torch.stack(columns, 1)[:, None, :]


def training_step(compute: Callable[[], Tensor], params: list[Tensor]) -> Callable[[], object]:
    """compute() with create_graph, then a backward pass of a scalar loss into the parameters."""
    def step() -> object:
        result = compute()
        return torch.autograd.grad(result.square().mean(), params, allow_unused=True)
    return step


# ---------------------------------------------------------------------------------------------
# Part 1: physics-informed networks

def pinn_cases(quick: bool) -> list[tuple[str, int, int, str, bool]]:
    if quick:
        return [(m, n, 64, "laplacian", cg) for m in ("wrapped", "hard_constraint") for n in (2,) for cg in (False, True)]
    return [(m, n, b, op, cg) for m in MODELS for n in (2, 10, 50) for b in (256, 4096)
            for op in ("laplacian", "hessian_diag") for cg in (False, True)]


def run_pinn_case(model: str, n: int, batch: int, op: str, train: bool, min_time: float) -> dict:
    torch.manual_seed(0)
    f = MODELS[model](n)
    x = torch.rand(batch, n)
    params = parameters(f)
    problem = Problem(op, f, x, create_graph=train)
    call = getattr(autojac, op)
    call(f, x, create_graph=train)  # tunes (its time is not counted here)
    plan = autojac.explain(f, x, op=op, create_graph=train)
    contenders: dict[str, Callable[[], object]] = {
        "nested": lambda: nested(op, f, x, train),
        "autojac": lambda: call(f, x, create_graph=train),
    }
    for name in ENGINE:
        contenders[name] = lambda s=registry.get(name): s(problem)
    if train:
        contenders = {name: training_step(fn, params) for name, fn in contenders.items()}  # type: ignore[arg-type]
    reference = nested(op, f, x, False).detach()
    check = max((registry.get(name)(Problem(op, f, x)) - reference).abs().max().item() for name in ENGINE)
    samples = compare(contenders, min_time=min_time, min_repeats=5)
    medians = {name: s.median for name, s in samples.items()}
    best = min(ENGINE, key=lambda name: medians[name])
    return {"model": model, "n": n, "batch": batch, "op": op, "train": train, "seconds": medians,
            "autojac_strategy": plan.label, "max_abs_difference": check, "engine_best": best,
            "engine_speedup": medians["nested"] / medians[best],
            "autojac_speedup": medians["nested"] / medians["autojac"]}


# ---------------------------------------------------------------------------------------------
# Part 2: Jacobians

def tanh_mlp(n: int, m: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, m))


def chain_flops(dims: list[int]) -> int:
    """FLOPs of the cheapest order of a chain of matrices of sizes dims[0] x dims[1], dims[1] x dims[2]...
    (the diagonal factors between them are free), per sample."""
    count = len(dims) - 1
    cost = [[0] * count for _ in range(count)]
    for length in range(2, count + 1):
        for i in range(count - length + 1):
            j = i + length - 1
            cost[i][j] = min(cost[i][k] + cost[k + 1][j] + dims[i] * dims[k + 1] * dims[j + 1] for k in range(i, j))
    return 2 * cost[0][count - 1]


def jacobian_strategies() -> list[str]:
    return [name for name in registry.names("jacobian") if name.startswith("jet_")]


def run_flops_case(min_time: float, machine_flops: float) -> dict:
    torch.manual_seed(0)
    f = tanh_mlp(512, 512)
    x = torch.randn(512, 512)
    flops = 512 * chain_flops([512, 64, 64, 512])
    fns: dict[str, Callable[[], object]] = {}
    for name in jacobian_strategies():
        strategy = registry.get(name)
        problem = Problem("jacobian", f, x)
        if strategy.applies is None or not strategy.applies(problem):
            fns[name] = lambda s=strategy, p=problem: s(p)
    fns["vmap(jacrev)"] = _vmap_jacrev(f, x)
    samples = compare(fns, min_time=min_time, min_repeats=3)
    seconds = {name: s.median for name, s in samples.items()}
    return {"shape": "B=512, 512 -> 64 -> 64 -> 512", "chain_flops": flops, "machine_flops": machine_flops,
            "seconds": seconds, "fraction_of_peak": {name: flops / t / machine_flops for name, t in seconds.items()}}


def _vmap_jacrev(f: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Tensor]:
    one = lambda xi: f(xi[None])[0]  # noqa: E731
    return lambda: torch.func.vmap(torch.func.jacrev(one))(x)


def jacobian_grid(quick: bool) -> list[tuple[int, int, int]]:
    if quick:
        return [(32, 2, 64), (32, 64, 1)]
    return [(b, n, m) for b in (1, 32, 512) for n in (2, 64, 512) for m in (1, 64, 512)]


def run_grid_case(batch: int, n: int, m: int, min_time: float) -> dict:
    torch.manual_seed(0)
    f = tanh_mlp(n, m)
    x = torch.randn(batch, n)
    autojac.jacobian(f, x)  # tunes
    plan = autojac.explain(f, x)
    fns: dict[str, Callable[[], object]] = {"vmap(jacrev)": _vmap_jacrev(f, x), "autojac": lambda: autojac.jacobian(f, x)}
    for name in jacobian_strategies():
        strategy = registry.get(name)
        problem = Problem("jacobian", f, x)
        if strategy.applies is None or not strategy.applies(problem):
            fns[name] = lambda s=strategy, p=problem: s(p)
    samples = compare(fns, min_time=min_time, min_repeats=3)
    seconds = {name: s.median for name, s in samples.items()}
    engine = min(t for name, t in seconds.items() if name.startswith("jet_"))
    return {"batch": batch, "n": n, "m": m, "seconds": seconds, "autojac_strategy": plan.label,
            "engine_speedup": seconds["vmap(jacrev)"] / engine,
            "autojac_speedup": seconds["vmap(jacrev)"] / seconds["autojac"]}


def interpretation_overhead(min_time: float) -> dict:
    """What interpreting costs per operation: a chain of 100 tanh on one sample of 2 inputs, the
    engine's forward Jacobian against the same torch kernels written by hand (tanh, 1 - y^2 as one
    fused call, its product with the tangents)."""
    from autojac.jet import api

    x = torch.randn(1, 2)
    tangents = torch.randn(2, 1, 2)
    one = torch.ones(())

    def chain(z: Tensor) -> Tensor:
        for _ in range(100):
            z = torch.tanh(z)
        return z

    def by_hand() -> Tensor:
        z, t = x, tangents
        for _ in range(100):
            z = torch.tanh(z)
            t = torch.addcmul(one, z, z, value=-1) * t
        return t

    with torch.no_grad():
        samples = compare({"f": lambda: chain(x), "by_hand": by_hand, "engine": lambda: api.jacobian(chain, x)},
                          min_time=min_time, min_repeats=5)
    seconds = {name: min(s.seconds) for name, s in samples.items()}  # the fastest call: the least disturbed
    return {"seconds": seconds, "per_operation": (seconds["engine"] - seconds["by_hand"]) / 100}


# ---------------------------------------------------------------------------------------------
# Report

def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# The engine against hand-written code ({meta['date']})", "",
             f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} threads; load average {meta['load_before']} "
             f"before, {meta['load_after']} after. Ratios are speed-ups (baseline time / contender time), timed "
             f"side by side, interleaved.", ""]
    if meta.get("busy"):
        lines += [f"> {meta['busy']}", ""]
    cases = result.get("pinn", [])
    if cases:
        lines += ["## Physics-informed networks: speed-up over nested autograd", "",
                  "| model | n | B | op | training step | nested (ms) | jet_laplacian | jet_fwd_rev | best engine | "
                  "autojac | autojac's plan |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in cases:
            s = c["seconds"]
            each = " | ".join(f"{s['nested'] / s[name]:.2f}x" for name in ENGINE)
            lines.append(f"| {c['model']} | {c['n']} | {c['batch']} | {c['op']} | {'yes' if c['train'] else 'no'} | "
                         f"{s['nested'] * 1e3:.3g} | {each} | {c['engine_speedup']:.2f}x | "
                         f"{c['autojac_speedup']:.2f}x | `{c['autojac_strategy']}` |")
        lines += ["", "Per model, over its cases (best engine strategy per case; autojac after tuning):", "",
                  "| model | engine geomean | engine worst | autojac geomean | autojac worst |", "|---|---|---|---|---|"]
        for model in dict.fromkeys(c["model"] for c in cases):
            own = [c for c in cases if c["model"] == model]
            e, a = [c["engine_speedup"] for c in own], [c["autojac_speedup"] for c in own]
            lines.append(f"| {model} | {geomean(e):.2f}x | {min(e):.2f}x | {geomean(a):.2f}x | {min(a):.2f}x |")
        every_e, every_a = [c["engine_speedup"] for c in cases], [c["autojac_speedup"] for c in cases]
        lines.append(f"| all | {geomean(every_e):.2f}x | {min(every_e):.2f}x | {geomean(every_a):.2f}x | {min(every_a):.2f}x |")
        lines.append("")
    overhead = result.get("overhead")
    if overhead:
        s = overhead["seconds"]
        lines += ["## Cost of interpreting", "",
                  f"A chain of 100 tanh on one sample (fastest calls): f alone {s['f'] * 1e6:.0f} us, its Jacobian by hand (the same kernels) "
                  f"{s['by_hand'] * 1e6:.0f} us, by the engine {s['engine'] * 1e6:.0f} us: "
                  f"{overhead['per_operation'] * 1e6:.1f} us per operation of interpretation.", ""]
    flops = result.get("flops")
    if flops:
        lines += ["## Jacobian of a 512 -> 64 -> 64 -> 512 tanh MLP at B=512", "",
                  f"Matmul ceiling {flops['machine_flops'] / 1e9:.0f} GFLOP/s (f32, measured in this run); "
                  f"the cheapest order of the chain costs {flops['chain_flops'] / 1e9:.1f} GFLOP.", "",
                  "| contender | ms | share of the ceiling |", "|---|---|---|"]
        for name, t in flops["seconds"].items():
            lines.append(f"| {name} | {t * 1e3:.1f} | {flops['fraction_of_peak'][name] * 100:.0f}% |")
        lines.append("")
    grid = result.get("grid", [])
    if grid:
        lines += ["## Jacobians on the 27-shape grid: speed-up over vmap(jacrev)", "",
                  "| B | in | out | vmap(jacrev) (ms) | best engine | engine | autojac | autojac's plan |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in grid:
            s = c["seconds"]
            best = min((t, name) for name, t in s.items() if name.startswith("jet_"))[1]
            lines.append(f"| {c['batch']} | {c['n']} | {c['m']} | {s['vmap(jacrev)'] * 1e3:.3g} | `{best}` | "
                         f"{c['engine_speedup']:.2f}x | {c['autojac_speedup']:.2f}x | `{c['autojac_strategy']}` |")
        lines.append(f"| geomean | | | | | {geomean([c['engine_speedup'] for c in grid]):.2f}x | "
                     f"{geomean([c['autojac_speedup'] for c in grid]):.2f}x | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON and markdown (default: a new temporary one)")
    parser.add_argument("--quick", action="store_true", help="a few small cases: a smoke test")
    parser.add_argument("--only", choices=("pinn", "jacobian"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per contender")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="autojac-pinn-"))
    out.mkdir(parents=True, exist_ok=True)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.5)
    date = datetime.datetime.now().astimezone()
    meta = {"date": date.isoformat(timespec="seconds"), "machine": f"{platform.processor() or platform.machine()} "
            f"({os.cpu_count()} CPUs, {platform.system()})", "torch": torch.__version__, "python": sys.version.split()[0],
            "threads": torch.get_num_threads(), "load_before": load_average(), "quick": args.quick}
    result: dict = {"meta": meta}
    started = time.perf_counter()
    if args.only in (None, "pinn"):
        result["pinn"] = []
        for case in pinn_cases(args.quick):
            result["pinn"].append(run_pinn_case(*case, min_time=min_time))
            c = result["pinn"][-1]
            print(f"{c['model']:>16} n={c['n']:<3} B={c['batch']:<5} {c['op']:<12} train={c['train']!s:<5} "
                  f"engine {c['engine_speedup']:.2f}x ({c['engine_best']}) autojac {c['autojac_speedup']:.2f}x", flush=True)
    result["overhead"] = interpretation_overhead(min_time)
    print(f"interpretation: {result['overhead']['per_operation'] * 1e6:.1f} us per operation", flush=True)
    if args.only in (None, "jacobian"):
        peak = matmul_flops(torch.device("cpu"), torch.float32, (512, 1024) if not args.quick else (256,), min_time)
        if not args.quick:
            result["flops"] = run_flops_case(min_time, peak)
            print("flops", {k: f"{v * 100:.0f}%" for k, v in result["flops"]["fraction_of_peak"].items()}, flush=True)
        result["grid"] = []
        for case in jacobian_grid(args.quick):
            result["grid"].append(run_grid_case(*case, min_time=min_time))
            c = result["grid"][-1]
            print(f"jacobian B={c['batch']} {c['n']} -> {c['m']}: engine {c['engine_speedup']:.2f}x "
                  f"autojac {c['autojac_speedup']:.2f}x", flush=True)
    meta["load_after"] = load_average()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["busy"] = busy_note(meta["load_before"], os.cpu_count() or 1, "when the run began") or \
        busy_note(meta["load_after"], os.cpu_count() or 1, "when the run ended", own=meta["threads"])
    stem = f"pinn-{date.strftime('%Y-%m-%d-%H%M')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
