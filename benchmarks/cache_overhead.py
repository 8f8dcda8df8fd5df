"""What the plan cache costs: a stored plan's lookup in a new process, and a cached call's
overhead over calling the winning strategy directly.

    python benchmarks/cache_overhead.py [--processes 7] [--pairs 3000]

1. Cold process. A plan is tuned and stored; then new Python processes (torch and autojac
   imported before the clock starts) each time the lookup of that plan, split into the call's
   signature and the store's answer (reading and validating the cache file), and their first
   `autojac.jacobian` call. Other new processes time the first call of the winning strategy
   itself, called directly: the difference of the two first calls is what the cache adds.
   With a cache of just that plan, and of 1,001 plans.
2. Warm calls in one process, side by side: the winning strategy called directly and
   `autojac.jacobian` with its plan read from the disk cache, alternated call by call; the
   overhead is the median of the paired differences, in wall time and in the calling thread's
   CPU time (which a loaded machine does not stretch). Because that difference is small next
   to the strategy's own noise, the dispatch is also timed alone: a plan whose strategy does
   nothing, called through autojac and directly, with the plan from disk and with a planner
   that only ever had memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import autojac  # noqa: E402
from autojac import cache  # noqa: E402
from autojac.planner import Planner, default_planner, set_default_planner  # noqa: E402
from autojac.problem import Problem  # noqa: E402
from autojac.signature import signature  # noqa: E402
from autojac.store import MemoryStore  # noqa: E402
from autojac.strategies import registry  # noqa: E402
from autojac.strategies.registry import Strategy  # noqa: E402

TITLE = "MLP 5 -> 2 -> 10 (sigmoid), B=3: the seed problem"


def _seed_problem() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 2), nn.Sigmoid(), nn.Linear(2, 10)), torch.randn(3, 5)


# -- cold ---------------------------------------------------------------------------------------

def cold_child(mode: str) -> dict[str, float]:
    """In a new process: the lookup and the first call through autojac, or the strategy's first call."""
    f, x = _seed_problem()
    if mode == "direct":
        name, chunk = os.environ["BENCH_STRATEGY"], os.environ["BENCH_CHUNK"]
        strategy = registry.get(name, "jacobian")
        start = time.perf_counter()
        strategy(Problem("jacobian", f, x), int(chunk) if chunk else None)
        return {"first_call": time.perf_counter() - start}
    planner = default_planner()
    start = time.perf_counter()
    sig = signature("jacobian", f, x)
    signed = time.perf_counter()
    plan = planner.store.get(sig.key)
    found = time.perf_counter()
    assert plan is not None and plan.tuned, "the plan was not in the cache"
    planner.plan = None  # planning now would fail loudly: the call must be served from the cache
    start_call = time.perf_counter()
    autojac.jacobian(f, x)
    first_call = time.perf_counter() - start_call
    return {"signature": signed - start, "store": found - signed, "lookup": found - start, "first_call": first_call}


def cold(processes: int, extra_plans: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        os.environ["AUTOJAC_CACHE_DIR"] = directory
        set_default_planner(Planner(cache.default_store()))
        f, x = _seed_problem()
        plan = autojac.explain(f, x)
        if extra_plans:
            default_planner().store.merge(plan.model_copy(update={"key": f"{i:032x}"}) for i in range(extra_plans))
        size = (Path(directory) / cache.FILE_NAME).stat().st_size
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "BENCH_STRATEGY": plan.strategy, "BENCH_CHUNK": str(plan.chunk or "")}
        runs: dict[str, list[dict[str, float]]] = {"autojac": [], "direct": []}
        for _ in range(processes):
            for mode in runs:  # alternated, so that the machine's mood hits both alike
                done = subprocess.run([sys.executable, __file__, "--cold-child", mode], env=env,
                                      capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(done.stdout))
    figures = {key: statistics.median(r[key] for r in runs["autojac"]) for key in runs["autojac"][0]}
    figures["direct_first_call"] = statistics.median(r["first_call"] for r in runs["direct"])
    figures["file_bytes"] = size
    figures["strategy"] = plan.label
    return figures


# -- warm ---------------------------------------------------------------------------------------

def paired(a: Callable[[], object], b: Callable[[], object], pairs: int,
           clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, float]:
    """Median seconds of a, of b, and of (b - a) over calls alternated pair by pair."""
    for _ in range(20):
        a(), b()
    times_a, times_b, differences = [], [], []
    for i in range(pairs):
        first, second = (a, b) if i % 2 == 0 else (b, a)  # alternate which goes first
        t0 = clock()
        first()
        t1 = clock()
        second()
        t2 = clock()
        ta, tb = (t1 - t0, t2 - t1) if first is a else (t2 - t1, t1 - t0)
        times_a.append(ta)
        times_b.append(tb)
        differences.append(tb - ta)
    return statistics.median(times_a), statistics.median(times_b), statistics.median(differences)


def warm(pairs: int) -> dict[str, object]:
    f, x = _seed_problem()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as directory, registry.temporary() as temporary:
        os.environ["AUTOJAC_CACHE_DIR"] = directory
        set_default_planner(Planner(cache.default_store()))
        plan = autojac.explain(f, x)
        # the answer itself, computed once: the plan's first call is cross-checked against plain
        # reverse-mode autograd (a plan this process did not tune), and must pass as a real one would
        answer = registry.get("sum_grad", "jacobian")(Problem("jacobian", f, x), None)
        noop = temporary.add(Strategy(name="bench_noop", ops=frozenset({"jacobian"}), run=lambda p, c: answer,
                                      memory=lambda s, c: 0, autograd=True))
        from_disk = Planner(cache.default_store())  # a new process's planner, as far as the file knows
        strategy = registry.get(plan.strategy, "jacobian")

        set_default_planner(from_disk)
        autojac.jacobian(f, x)  # reads the plan from the file, once
        for clock in (time.perf_counter, time.thread_time):  # wall time, and this thread's CPU time
            results[clock.__name__] = paired(lambda: strategy(Problem("jacobian", f, x), plan.chunk),
                                             lambda: autojac.jacobian(f, x), pairs, clock)

        noop_plan = plan.model_copy(update={"strategy": "bench_noop", "chunk": None,
                                            "created": datetime.now(timezone.utc)})
        for label, store in (("disk", cache.default_store()), ("memory", MemoryStore())):
            store.merge([noop_plan])  # the no-op plan under the real key
            set_default_planner(Planner(store))
            assert autojac.explain(f, x).strategy == "bench_noop"
            results[label] = paired(lambda: noop(Problem("jacobian", f, x), None),
                                    lambda: autojac.jacobian(f, x), pairs * 5)
            store.clear()
    results["strategy"] = plan.label
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=7, help="new processes per cold measurement and mode")
    parser.add_argument("--pairs", type=int, default=3000, help="alternated call pairs per warm measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine a second thread adds noise)")
    parser.add_argument("--warm-only", action="store_true", help="skip the cold-process measurements")
    parser.add_argument("--cold-child", choices=("autojac", "direct"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the new processes
    if args.cold_child:
        print(json.dumps(cold_child(args.cold_child)))
        return
    print(f"{TITLE}; torch {torch.__version__}, torch threads: {torch.get_num_threads()}, Python "
          f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}\n")
    print(f"Cold process (medians over {args.processes} new processes per row):")
    for extra in () if args.warm_only else (0, 1000):
        c = cold(args.processes, extra)
        print(f"  cache of {1 + extra} plans ({c['file_bytes'] / 1024:.0f} KB): lookup {c['lookup'] * 1e3:.2f} ms "
              f"(signature {c['signature'] * 1e3:.2f} ms + store {c['store'] * 1e3:.2f} ms); first call "
              f"{c['first_call'] * 1e3:.1f} ms vs the strategy's ({c['strategy']}) own first call "
              f"{c['direct_first_call'] * 1e3:.1f} ms")
    w = warm(args.pairs)
    print(f"\nWarm calls ({args.pairs} alternated pairs; the no-op rows {args.pairs * 5}):")
    for clock, what in (("perf_counter", "wall time"), ("thread_time", "CPU time of the calling thread")):
        direct, ours, difference = w[clock]
        print(f"  {what}: {w['strategy']} directly {direct * 1e6:.1f} us, autojac.jacobian (plan from disk) "
              f"{ours * 1e6:.1f} us: overhead {difference * 1e6:+.1f} us (median of paired differences)")
    for label, what in (("disk", "plan read from the disk cache"), ("memory", "plan only ever in memory")):
        direct, ours, difference = w[label]
        print(f"  dispatch alone, {what}: no-op strategy directly {direct * 1e6:.1f} us, through autojac.jacobian "
              f"{ours * 1e6:.1f} us: overhead {difference * 1e6:+.1f} us")


if __name__ == "__main__":
    main()
