"""Second-order operations: autojac after tuning against every fixed candidate, vmap(hessian) and
the full-batch Hessian, on a grid of batch size x input width x output width (a tanh MLP).

    PYTHONPATH=. python benchmarks/second_order.py [--quick] [--ops laplacian,hvp] [--create-graph both]
                                                   [--out figures.json] [--report figures.json]

For each operation and shape it tunes autojac (AUTOJAC_TUNE_BUDGET, default 1 s per plan), then
times side by side, interleaved (autojac.timing.compare): autojac's cached call, each valid
strategy as a fixed choice, and the baselines people use without autojac. With --create-graph on
each contender is timed with a backward pass of a scalar loss to the parameters (what a training
step pays). Timings on a shared machine are noisy: read the ratios within one run (each round of
timing runs the contenders in a new order, and the fastest calls are reported beside the medians).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import autojac
from autojac import memory
from autojac.planner import candidates, default_planner
from autojac.problem import Problem, Sizes
from autojac.signature import signature
from autojac.strategies.basis import one_sample
from autojac.timing import Clock, compare, timed

OPS = ("hessian", "hvp", "hessian_diag", "laplacian")
HIDDEN = 64
FULL_HESSIAN_LIMIT = 2**30  # bytes: the whole-batch Hessian is not attempted above this
HOPELESS = 10.0  # a contender this many times slower than the best single call is timed once only
MIN_REPEATS = 5  # timed calls per contender at the least (the median of one call is noise)
MEMORY_SHARE = 0.1  # of the available RAM per candidate (autojac's default is 0.5): the machine is shared


def tanh_mlp(n: int, m: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, m))


def call(op: str, f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, **options: object) -> Tensor:
    return autojac.hvp(f, x, v, **options) if op == "hvp" else getattr(autojac, op)(f, x, **options)


def finish(op: str, hessian: Tensor, v: Tensor) -> Tensor:
    """(B, m, n, n) -> what op returns."""
    if op == "hessian":
        return hessian
    if op == "hvp":
        return (hessian @ v[:, None, :, None]).squeeze(-1)
    diag = hessian.diagonal(dim1=-2, dim2=-1)
    return diag if op == "hessian_diag" else diag.sum(-1)


def baselines(op: str, f: nn.Module, x: Tensor, v: Tensor, create_graph: bool) -> dict[str, Callable[[], Tensor]]:
    """What people write without autojac: vmap(torch.func.hessian), and the Hessian of the whole
    batch (torch.autograd.functional.hessian of the batch-summed output) cut into blocks."""
    found: dict[str, Callable[[], Tensor]] = {}
    batch, n = x.shape
    if op == "hvp":
        return found
    per_sample = torch.func.vmap(torch.func.hessian(one_sample(f)))
    found["vmap(hessian)"] = lambda: finish(op, per_sample(x), v)
    small = (batch * n) ** 2 * x.element_size() * 4 <= FULL_HESSIAN_LIMIT
    if op in ("hessian_diag", "laplacian") and small and not create_graph:  # kept differentiable it takes minutes
        m = f[-1].out_features
        rows = torch.arange(batch)

        def whole_batch() -> Tensor:
            blocks = []
            for k in range(m):
                full = torch.autograd.functional.hessian(lambda z: f(z)[:, k].sum(), x, vectorize=True)
                blocks.append(full[rows, :, rows, :])  # (B, n, n)
            return finish(op, torch.stack(blocks, 1), v)

        found["full-batch Hessian"] = whole_batch
    return found


def fixed_candidates(op: str, f: nn.Module, x: Tensor, v: Tensor, plan: autojac.Plan,
                     create_graph: bool) -> dict[str, Callable[[], Tensor]]:
    """Every strategy valid for f, unchunked where that fits in memory, as a fixed choice."""
    problem = Problem(op, f, x, v if op == "hvp" else None)
    sig = signature(op, f, x)
    probes = default_planner().probes(sig, problem)
    sizes = Sizes.of(x, probes.out_shape, probes.activations)
    pool, _ = candidates(op, sizes, probes, create_graph=create_graph, budget=memory.budget_bytes(x.device),
                         problem=problem)
    chosen: dict[str, int | None] = {}
    for candidate in pool:  # the first chunk that fits: unchunked if it does
        chosen.setdefault(candidate.strategy.name, candidate.chunk)
    chosen[plan.strategy] = plan.chunk if plan.strategy not in chosen else chosen[plan.strategy]
    labels = {name: name if chunk is None else f"{name}[chunk={chunk}]" for name, chunk in chosen.items()}
    if plan.label not in labels.values():
        labels[plan.label] = plan.label
    return {label: (lambda label=label: call(op, f, x, v, strategy=label, create_graph=create_graph))
            for label in labels.values()}


def with_backward(fn: Callable[[], Tensor], params: list[Tensor]) -> Callable[[], Tensor]:
    def run() -> Tensor:
        result = fn()
        torch.autograd.grad(result.square().sum(), params, allow_unused=True)
        return result
    return run


def measure(op: str, batch: int, n: int, m: int, create_graph: bool, min_time: float) -> dict:
    torch.manual_seed(0)
    f, x, v = tanh_mlp(n, m), torch.randn(batch, n), torch.randn(batch, n)
    options = dict(create_graph=create_graph)
    started = time.perf_counter()
    plan = autojac.explain(f, x, op=op, v=v if op == "hvp" else None, **options)
    tuning = time.perf_counter() - started
    contenders = {"autojac": lambda: call(op, f, x, v, **options)}
    contenders.update(fixed_candidates(op, f, x, v, plan, create_graph))
    contenders.update(baselines(op, f, x, v, create_graph))
    if create_graph:
        params = list(f.parameters())
        contenders = {name: with_backward(fn, params) for name, fn in contenders.items()}
    single = {}
    for name, fn in contenders.items():
        timed(Clock(), fn)  # warm-up
        single[name] = timed(Clock(), fn)[1]
    best_single = min(single.values())
    hopeful = {name: fn for name, fn in contenders.items() if single[name] <= HOPELESS * best_single}
    samples = compare(hopeful, min_time=min_time, max_repeats=30, min_repeats=MIN_REPEATS)
    times = {name: (samples[name].median if name in samples else single[name]) for name in contenders}
    fastest = {name: (min(samples[name].seconds) if name in samples else single[name]) for name in contenders}
    return dict(op=op, batch=batch, n=n, m=m, create_graph=create_graph, plan=plan.label,
                tuning_seconds=tuning, times=times, fastest=fastest, once={k: k not in samples for k in contenders})


BASELINES = ("vmap(hessian)", "full-batch Hessian")


def report(rows: list[dict]) -> list[str]:
    """Per operation: autojac against the best fixed candidate by medians, and by fastest calls
    (interference on a shared machine only ever adds time), the baselines, and each fixed
    strategy's slowdown against the best."""
    lines = []
    for create_graph in sorted({r["create_graph"] for r in rows}):
        for op in OPS:
            mine = [r for r in rows if r["op"] == op and r["create_graph"] == create_graph]
            if not mine:
                continue
            what = "derivative + backward" if create_graph else "derivative"
            lines.append(f"\n== {op} ({what}): medians in ms; ours/best by medians and by fastest calls; "
                         f"baselines' medians over autojac's")
            lines.append(f"{'B':>4} {'n':>4} {'m':>2}  {'autojac':>9} {'choice':<22} {'best fixed':>9} {'(name)':<22} "
                         f"{'ours/best':>9} {'(fastest)':>9} {'vmap(hess)':>10} {'full-batch':>10}")
            ratios, fastest_ratios, choice_ratios, twin_ratios, per_strategy = [], [], [], [], {}
            for r in mine:
                times, fastest = r["times"], r.get("fastest", r["times"])
                fixed = {k: t for k, t in times.items() if k != "autojac" and k not in BASELINES}
                best_name = min(fixed, key=fixed.get)
                ours = times["autojac"]
                ratios.append(ours / fixed[best_name])
                choice_ratios.append(fixed.get(r["plan"], ours) / fixed[best_name])
                twin_ratios.append(ours / fixed.get(r["plan"], ours))
                fastest_ratios.append(fastest["autojac"] / min(fastest[k] for k in fixed))
                for name, t in fixed.items():
                    per_strategy.setdefault(name.split("[")[0], []).append(t / fixed[best_name])
                base = [f"{times[b] / ours:9.1f}x" if b in times else f"{'-':>10}" for b in BASELINES]
                lines.append(f"{r['batch']:>4} {r['n']:>4} {r['m']:>2}  {ours * 1e3:9.3f} {r['plan']:<22} "
                             f"{fixed[best_name] * 1e3:9.3f} {best_name:<22} {ratios[-1]:9.2f} {fastest_ratios[-1]:9.2f} "
                             f"{base[0]} {base[1]}")
                if op == "laplacian" and "jet_laplacian" in times:
                    others = {k: times[k] / times["jet_laplacian"] for k in ("hvp_diag", "grad_grad_diag", "loop_diag",
                                                                                 "fwd_fwd_diag") if k in times}
                    lines.append("      jet_laplacian is " + ", ".join(
                        f"{ratio:.1f}x faster than {k}" for k, ratio in others.items()))
            lines.append(f"geometric mean of autojac / best fixed: {_geomean(ratios):.3f} by medians (worst "
                         f"{max(ratios):.2f}), {_geomean(fastest_ratios):.3f} by fastest calls, over {len(ratios)} shapes")
            lines.append(f"  autojac's choice, named as a fixed strategy, over the best: {_geomean(choice_ratios):.3f} "
                         f"(worst {max(choice_ratios):.2f}); autojac over that same strategy named: "
                         f"{_geomean(twin_ratios):.3f} (the same work: overhead and noise)")
            for name, slow in sorted(per_strategy.items(), key=lambda kv: _geomean(kv[1])):
                lines.append(f"  fixed {name:<20} geometric-mean slowdown {_geomean(slow):6.2f} "
                             f"worst {max(slow):7.2f} over {len(slow)} shapes")
    return lines


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=32 only, n in {2, 16}")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--create-graph", choices=("off", "on", "both"), default="off",
                        help="time the derivative (off), derivative + backward (on), or both")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of timing per contender")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared machine more threads mostly add noise)")
    parser.add_argument("--out", help="write the figures as JSON here (after every shape)")
    parser.add_argument("--report", help="only print the report of a JSON file written by --out")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as saved:
            print("\n".join(report(json.load(saved))))
        return
    torch.set_num_threads(args.threads)
    memory.SAFETY = MEMORY_SHARE
    batches, widths, outs = ((32,), (2, 16), (1, 8)) if args.quick else ((32, 512), (2, 16, 128), (1, 8))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tanh MLP n -> {HIDDEN} -> {HIDDEN} -> m")
    rows = []
    for create_graph in {"off": (False,), "on": (True,), "both": (False, True)}[args.create_graph]:
        for op in args.ops.split(","):
            for batch in batches:
                for n in widths:
                    for m in outs:
                        row = measure(op, batch, n, m, create_graph, args.min_time)
                        rows.append(row)
                        if args.out:  # after every shape, so that an interrupted run keeps what it measured
                            with open(args.out, "w") as out:
                                json.dump(rows, out, indent=1)
                        print(f"{op} B={batch} n={n} m={m} create_graph={create_graph}: {row['plan']} "
                              f"{row['times']['autojac'] * 1e3:.3f} ms", flush=True)
    print("\n".join(report(rows)))


if __name__ == "__main__":
    main()
