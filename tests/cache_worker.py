"""One process of the cross-process cache tests (tests/test_cache.py starts these).

    python cache_worker.py MODE BATCH OUT [GO]

MODE "tune": make the plan for mlp(5, 3) at a batch of BATCH (after the file GO exists, if
given, so that several workers tune at the same moment). MODE "use": call autojac.jacobian for
that signature, counting every entry into planning, probing and timing. Writes a JSON report
to OUT. The cache directory comes from AUTOJAC_CACHE_DIR.
"""

import json
import os
import sys
import time

import torch

import autojac
from autojac import planner as planner_module

from helpers import loop_jacobian, mlp


def main(mode: str, batch: int, out_path: str, go: str | None = None) -> None:
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
    if go is not None:
        while not os.path.exists(go):
            time.sleep(0.01)
    if mode == "tune":
        result = autojac.jacobian(model, x)
    else:
        start = time.perf_counter()
        result = autojac.jacobian(model, x)
        first_call = time.perf_counter() - start
    report = {
        "plan": autojac.explain(model, x).model_dump(mode="json"),
        "entered": entered,
        "correct": bool(torch.allclose(result, loop_jacobian(model, x), rtol=1e-4, atol=1e-5)),
        "first_call_seconds": None if mode == "tune" else first_call,
    }
    with open(out_path, "w") as out:
        json.dump(report, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
