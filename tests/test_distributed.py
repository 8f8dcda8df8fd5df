"""Plans shared across torch.distributed ranks (2 CPU processes, gloo on loopback)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_0_tunes_and_rank_1_uses_its_plan(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "AUTOJAC_TUNE_BUDGET": "0.3", "AUTOJAC_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in (0, 1):
        rank_env = {**env, "AUTOJAC_CACHE_DIR": str(tmp_path / f"cache{rank}")}
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "dist_worker.py"), str(rank), str(port),
                                       str(tmp_path / f"rank{rank}.json")], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    assert rank0["correct"] and rank1["correct"]
    assert rank0["plan"] == rank1["plan"]  # the very plan rank 0 made: same strategy, timings, time stamp
    assert rank0["plan"]["tuned"] and rank0["tuned_here"] >= 1
    assert rank1["tuned_here"] == 0  # rank 1 timed nothing
    assert rank0["early_plan"] == rank1["early_plan"] and rank1["early_correct"]  # made before the group
    assert rank1["known_seconds"] < 1.5  # it had that plan: it did not wait for rank 0 (asleep for 3 s)
    # a signature rank 0 never resolves: after AUTOJAC_DIST_TIMEOUT, the heuristic choice and a warning
    assert rank1["alone_correct"] and not rank1["alone_tuned"]
    assert "rank 0 published no plan within 2 s" in rank1["alone_warning"]
    assert rank1["alone_seconds"] < 10
    # only rank 0 stores what the group decided; rank 1 holds just the plan it made before joining
    assert rank0["stored"] == 3 and rank1["stored"] == 1
