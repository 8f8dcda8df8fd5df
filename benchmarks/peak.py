"""Peak memory of one contender on the CPU, measured in a fresh process.

`python -m benchmarks.peak SPEC` (SPEC: JSON with workload, op, batch, dtype, label, kind,
threads) builds the case, warms torch.func up on a tiny problem, resets the process's peak
resident size (Linux: /proc/self/clear_refs), runs the contender once, and prints
{"peak": bytes above the resident size before the call}. `peak_rss` runs it from the runner.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            found = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _reset_peak() -> bool:
    """Reset the peak resident size (VmHWM) to the current one; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _max_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _warm_transforms() -> None:
    x = torch.ones(2, 1)
    _, pullback = torch.func.vjp(torch.sin, x)
    torch.func.vmap(pullback)(torch.ones(1, 2, 1))
    torch.func.vmap(lambda t: torch.func.jvp(torch.sin, (x,), (t,)))(torch.ones(1, 2, 1))


def main(argv: list[str]) -> int:
    from .measure import contender_for_peak
    from .workloads import Case, catalog

    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    case = Case("", catalog()[spec["workload"]], spec["op"], spec["batch"], spec["dtype"])
    run = contender_for_peak(case, spec["label"], spec["kind"])
    _warm_transforms()
    exact = _reset_peak()
    before = _status_kib("VmRSS") * 1024 if exact else _max_rss_bytes()
    run()
    after = _status_kib("VmHWM") * 1024 if exact else _max_rss_bytes()
    print(json.dumps({"peak": max(after - before, 0), "exact": exact}))
    return 0


def peak_rss(spec: dict, timeout: float) -> tuple[int | None, str]:
    """Run `main` in a fresh interpreter: (peak bytes, "") or (None, why not)."""
    env = dict(os.environ, AUTOJAC_TUNE="0")  # the baselines ask autojac for a plan: no tuning here
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.peak", json.dumps(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"peak-memory subprocess ran over {timeout:g} s"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"peak-memory subprocess failed: {tail}"[:300]
    report = json.loads(lines[-1])
    note = "" if report["exact"] else "peak RSS of the whole process (no /proc/self/clear_refs)"
    return int(report["peak"]), note


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
