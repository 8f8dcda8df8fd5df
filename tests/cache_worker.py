"""Processes of the cross-process cache tests (tests/test_cache.py starts these).

    python cache_worker.py tune BATCH OUT
    python cache_worker.py use BATCH OUT
    python cache_worker.py fan-out OUT_PREFIX BATCH [BATCH ...]

"tune" makes the plan for mlp(5, 3) at a batch of BATCH; "use" calls autojac.jacobian for that
signature, counting every entry into planning, probing and timing. Each writes a JSON report
to OUT. "fan-out" imports torch once and then forks one process per BATCH, all tuning at the
same moment, each writing OUT_PREFIX + BATCH + ".json" (forking spares each worker torch's
start-up, seconds on a busy machine). The cache directory comes from AUTOJAC_CACHE_DIR.
"""

import json
import os
import sys

import torch

import autojac
from autojac import cache, planner as planner_module

from helpers import loop_jacobian, mlp


def main(mode: str, batch: int, out_path: str) -> None:
    torch.manual_seed(0)
    model, x = mlp(5, 3), torch.randn(batch, 5)
    entered = {"plan": 0, "probes": 0, "timed": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            entered[name] += 1
            return real(*args, **kwargs)
        return wrapper

    planner = planner_module.default_planner()
    planner.plan = counting("plan", planner.plan)
    planner.probes = counting("probes", planner.probes)
    planner_module.choose = counting("timed", planner_module.choose)
    result = autojac.jacobian(model, x)  # "tune": planned here; "use": must come from the cache
    report = {
        "plan": autojac.explain(model, x).model_dump(mode="json"),
        "entered": entered,
        "correct": bool(torch.allclose(result, loop_jacobian(model, x), rtol=1e-4, atol=1e-5)),
    }
    with open(out_path, "w") as out:
        json.dump(report, out)


def fan_out(prefix: str, batches: list[int]) -> None:
    torch.set_num_threads(1)  # no thread pool exists when the children are forked
    planner_module._warm_transforms()
    children = []
    for batch in batches:
        pid = os.fork()
        if pid == 0:  # the child: its own planner, store and file descriptors
            code = 1
            try:
                planner_module.set_default_planner(planner_module.Planner(cache.default_store()))
                main("tune", batch, f"{prefix}{batch}.json")
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    if sys.argv[1] == "fan-out":
        fan_out(sys.argv[2], [int(b) for b in sys.argv[3:]])
    else:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
