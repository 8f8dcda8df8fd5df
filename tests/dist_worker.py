"""One rank of the distributed test (tests/test_distributed.py starts two of these)."""

import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

import autojac
from autojac import planner as planner_module

from helpers import loop_jacobian, mlp


def main(rank: int, port: int, out_path: str) -> None:
    torch.manual_seed(0)
    model = mlp(8, 4)
    # batch sizes more than 2x apart: none reuses another's plan
    x, x_known, x_alone, x_early = torch.randn(47, 8), torch.randn(5, 8), torch.randn(11, 8), torch.randn(23, 8)
    report = {"rank": rank}
    if rank == 1:
        autojac.explain(model, x_known)  # this rank has that plan before the group exists
    else:
        autojac.explain(model, x_early)  # rank 0 has that one before the group exists
    timed = []
    real_choose = planner_module.choose
    planner_module.choose = lambda pool, run, **kw: (timed.append(kw["tune"]), real_choose(pool, run, **kw))[1]

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = autojac.jacobian(model, x)  # rank 0 tunes; rank 1 waits for its plan
    report["plan"] = autojac.explain(model, x).model_dump(mode="json")
    report["correct"] = bool(torch.allclose(result, loop_jacobian(model, x), rtol=1e-4, atol=1e-5))
    report["tuned_here"] = sum(timed)

    # a plan rank 0 made before the group existed reaches rank 1 when rank 0 uses it in the group
    early = autojac.jacobian(model, x_early)
    report["early_plan"] = autojac.explain(model, x_early).model_dump(mode="json")
    report["early_correct"] = bool(torch.allclose(early, loop_jacobian(model, x_early), rtol=1e-4, atol=1e-5))
    report["tuned_here"] = sum(timed)

    if rank == 0:
        time.sleep(3)  # rank 1 must not wait for this
        autojac.jacobian(model, x_known)
    else:
        start = time.perf_counter()
        autojac.jacobian(model, x_known)
        report["known_seconds"] = time.perf_counter() - start
        os.environ["AUTOJAC_DIST_TIMEOUT"] = "2"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            alone = autojac.jacobian(model, x_alone)  # rank 0 never asks for this one
            report["alone_seconds"] = time.perf_counter() - start
        report["alone_warning"] = " ".join(str(w.message) for w in caught)
        report["alone_correct"] = bool(torch.allclose(alone, loop_jacobian(model, x_alone), rtol=1e-4, atol=1e-5))
        report["alone_tuned"] = autojac.explain(model, x_alone, tune=False).tuned
    report["stored"] = len(planner_module.default_planner().store.plans())
    dist.barrier()
    dist.destroy_process_group()
    with open(out_path, "w") as out:
        json.dump(report, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
