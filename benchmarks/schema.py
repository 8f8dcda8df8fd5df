"""Pydantic models of a benchmark run: what the JSON file under benchmarks/results/ holds.

Times are seconds (medians of interleaved repeats), memory is bytes, ratios are plain floats.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

Status = Literal["ok", "single", "timeout", "oom", "error", "excluded", "skipped"]
TIMED: tuple[str, ...] = ("ok", "single")  # statuses that carry a time
Kind = Literal["fixed", "baseline", "autojac"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Machine(_Model):
    """Where and with what the run was made."""

    device: str = Field(description="Device type: 'cpu' or 'cuda'.")
    device_name: str = Field(description="CPU model name, or the GPU's name.")
    slug: str = Field(description="Short file-name-safe device name used in result file names.")
    hostname: str
    platform: str = Field(description="platform.platform().")
    python: str
    torch: str = Field(description="torch.__version__.")
    autojac: str = Field(description="autojac.__version__.")
    threads: int = Field(ge=1, description="torch.get_num_threads() during the run.")
    cpu_count: int = Field(ge=1, description="os.cpu_count().")
    load_average: list[float] = Field(
        default_factory=list, description="os.getloadavg() (1, 5, 15 min) when the run started: a busy machine "
                                          "makes every timing unreliable.")
    matmul_flops: dict[str, float] = Field(
        description="dtype -> measured FLOP/s of a square matmul: the machine's ceiling.")


class Settings(_Model):
    """How hard the run measured."""

    mode: Literal["quick", "full", "custom"]
    suites: list[str]
    ops: list[str] = Field(description="Operations measured (registered strategies and a public call).")
    min_time: float = Field(description="Seconds of timed calls per contender (after one warm-up).")
    min_repeats: int = Field(description="Timed calls per contender at least, whatever min_time says.")
    repeat_cap: float = Field(description="A contender whose first call is slower is timed once only.")
    call_cap: float = Field(description="A call still running after this many seconds is stopped (timeout).")
    tune_cap: float = Field(description="Limit on autojac's first (tuning) call.")
    estimate_cap: float = Field(description="Cases whose estimated cheapest call is slower are skipped.")
    chunks: Literal["all", "unchunked"] = Field(
        description="Fixed strategies at every chunk size the registry offers, or unchunked only "
                    "(plus autojac's own choice).")
    coupled_only: bool = Field(
        description="Also time the strategies the planner keeps for batch-coupled f (full_diag) on "
                    "batch-independent f: a user may pick them, autojac does not.")
    memory: Literal["none", "key", "all"] = Field(
        description="CPU peak memory: never; for B >= 512, of autojac's choice, the oracle and the "
                    "baselines; or of every contender everywhere. CUDA: always, every contender.")
    dispatch_time: float = Field(description="Seconds of timed calls per side of the dispatch comparison.")
    tune_budget: float = Field(description="AUTOJAC_TUNE_BUDGET in force: autojac's tuning seconds per plan.")
    command: str


class Measurement(_Model):
    """One contender on one case: a fixed strategy, a baseline, or autojac's public call."""

    label: str = Field(description="Strategy label (e.g. 'sum_rev[chunk=16]'), baseline name, or 'autojac'.")
    kind: Kind
    status: Status
    median: float | None = Field(default=None, description="Median seconds per call (single call if 'single').")
    p20: float | None = None
    p80: float | None = None
    repeats: int = Field(default=0, ge=0, description="Timed calls after the warm-up.")
    reason: str = Field(default="", description="Why not timed, or how it failed; a note otherwise.")
    memory_estimate: int | None = Field(default=None, description="autojac's estimate of peak bytes.")
    peak_memory: int | None = Field(
        default=None, description="Measured peak bytes above the inputs (CUDA: max_memory_allocated; "
                                  "CPU: peak RSS growth of a fresh subprocess).")
    agrees: bool | None = Field(default=None, description="Result matches autojac's within the dtype's tolerance.")


class Dispatch(_Model):
    """A tuned public call against the winning strategy called directly, many repeats each."""

    autojac: float = Field(description="Median seconds of the public call.")
    direct: float = Field(description="Median seconds of strategies.get(plan.strategy)(Problem(...), plan.chunk).")
    overhead: float = Field(description="autojac - direct, seconds.")
    repeats: int


class CaseResult(_Model):
    """One workload at one shape, dtype and operation."""

    suite: str
    workload: str
    title: str
    op: str
    batch: int
    in_shape: list[int]
    out_shape: list[int] | None = None
    dtype: str
    status: Literal["ok", "skipped", "failed"]
    reason: str = ""
    batch_independent: bool | None = None
    vmap_ok: bool | None = None
    measurements: list[Measurement] = Field(default_factory=list)
    chosen: str | None = Field(default=None, description="autojac's choice (candidate label).")
    tuning_seconds: float | None = Field(default=None, description="Wall time of the first public call.")
    autojac: float | None = Field(default=None, description="Median seconds of the tuned public call.")
    oracle: str | None = Field(default=None, description="The fastest fixed strategy that agrees.")
    oracle_time: float | None = None
    regret: float | None = Field(default=None, description="autojac / oracle_time.")
    tutorial: str | None = Field(default=None, description="The op's tutorial baseline, e.g. vmap(jacrev).")
    speedup_tutorial: float | None = Field(default=None, description="tutorial time / autojac time.")
    speedup_tutorial_at_least: bool = Field(
        default=False, description="The tutorial baseline timed out: the speed-up is a lower bound.")
    full: str | None = Field(default=None, description="The op's full-batch baseline (which one was used).")
    speedup_full: float | None = None
    speedup_full_at_least: bool = False
    flops: int | None = Field(default=None, description="matmul/conv FLOPs of one call of autojac's choice.")
    achieved_flops: float | None = Field(default=None, description="flops / the choice's median, FLOP/s.")
    ceiling_fraction: float | None = Field(default=None, description="achieved_flops / matmul FLOP/s.")
    dispatch: Dispatch | None = None
    seconds: float = Field(default=0.0, description="Wall time spent on this case.")


class GroupSummary(_Model):
    """Aggregates over the measured cases of one suite and operation (or of everything)."""

    suite: str
    op: str
    cases: int
    measured: int
    regret_geomean: float | None = None
    regret_worst: float | None = None
    regret_worst_case: str | None = None
    within_110: float | None = Field(default=None, description="Share of cases with regret <= 1.10.")
    choice_regret_geomean: float | None = Field(
        default=None, description="Geometric mean of the chosen strategy's own fixed time over the oracle's: the "
                                  "quality of the choice apart from dispatch overhead and timing noise.")
    choice_regret_worst: float | None = None
    speedup_tutorial_geomean: float | None = None
    speedup_full_geomean: float | None = None
    tuning_seconds_median: float | None = None
    wins: dict[str, int] = Field(default_factory=dict, description="Strategy -> cases where it was the oracle.")
    slowdown_geomean: dict[str, float] = Field(
        default_factory=dict, description="Strategy -> geometric mean of its best time / the oracle's.")
    slowdown_worst: dict[str, float] = Field(default_factory=dict)


class Run(_Model):
    """A benchmark run: the machine, the settings, every case, and the aggregates."""

    schema_version: int = SCHEMA_VERSION
    created: datetime
    seconds: float = Field(description="Wall time of the whole run.")
    machine: Machine
    settings: Settings
    notes: list[str] = Field(default_factory=list, description="Operations skipped and other remarks.")
    cases: list[CaseResult]
    summaries: list[GroupSummary] = Field(default_factory=list)
    load_average_end: list[float] = Field(default_factory=list, description="os.getloadavg() when the run ended.")
    dispatch_overhead_median: float | None = Field(
        default=None, description="Median of the per-case dispatch overheads, seconds.")
