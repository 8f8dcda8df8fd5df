"""Pydantic models for plans: what was chosen for one problem signature, and why.

A plan is data. Its strategy name is looked up in the registry before use; nothing
in a plan is ever executed or unpickled.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated, Final, Literal, get_args

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from .memory import format_bytes

# The operations, for type checkers: `op: autojac.Op` accepts these strings and flags others.
Op = Literal["jacobian", "hessian", "hvp", "hessian_diag", "laplacian", "divergence", "derivatives"]
OPS: tuple[Op, ...] = get_args(Op)
# What `derivatives` can compute together, in the order its results come in.
DERIVATIVES = ("value", "jacobian", "hessian_diag", "laplacian", "hessian")
FILE_FORMAT: Final = "autojac-plans"
# Bumped whenever Plan or PlanFile change incompatibly; part of every cache key and file name.
FORMAT_VERSION = 2

# Bounds keep a crafted file from smuggling in values that break arithmetic (inf, 10**400).
Seconds = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=2**62)]
Size = Annotated[int, Field(ge=0, le=2**62)]
Key = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _made_already(when: datetime) -> datetime:
    """In UTC, and not in the future: a crafted date far ahead would keep a plan from ever being
    replaced by a newer one (a day of slack covers clocks that disagree)."""
    if when > _now() + timedelta(days=1):
        raise ValueError(f"{when.isoformat()} is in the future")
    return when.astimezone(timezone.utc)


# Naive times cannot be compared with aware ones: a plan file must say which time zone it means.
Created = Annotated[AwareDatetime, AfterValidator(_made_already)]


class Timing(BaseModel):
    """How long one candidate took, over the repeats that were measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    median: Seconds = Field(description="Median seconds per call.")
    p20: Seconds = Field(description="20th percentile of seconds per call.")
    p80: Seconds = Field(description="80th percentile of seconds per call.")
    repeats: Count = Field(ge=1, description="How many timed calls the figures are taken over.")


class Plan(BaseModel):
    """The chosen strategy for one problem signature, with the evidence for the choice."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Key = Field(description="Hash of the signature; the cache key.")
    op: str = Field(description="Operation: jacobian, hessian, hvp, hessian_diag or laplacian.")
    strategy: str = Field(description="Registry name of the winning strategy.")
    chunk: int | None = Field(
        default=None, ge=1, le=2**62, description="Basis vectors per vectorized pass; None is all at once."
    )
    timings: dict[str, Seconds] = Field(
        default_factory=dict, description="Candidate label -> median seconds, for every candidate timed."
    )
    spread: dict[str, Timing] = Field(
        default_factory=dict, description="Candidate label -> median, p20, p80 and repeat count."
    )
    excluded: dict[str, str] = Field(
        default_factory=dict, description="Candidate label -> why it was not chosen or not timed."
    )
    memory: dict[str, Size] = Field(
        default_factory=dict, description="Candidate label -> estimated peak bytes."
    )
    tuned: bool = Field(description="True when chosen by measurement, False when by the heuristic.")
    batch_independent: bool = Field(description="Whether sample b's output depends only on x[b].")
    vmap_ok: bool = Field(description="Whether f runs under torch.func.vmap on single samples.")
    deterministic: bool = Field(description="Whether two calls of f on the same x agreed.")
    batch_size: Size = Field(description="B, the size of the first dimension of x.")
    in_shape: tuple[Size, ...] = Field(description="Per-sample input shape, x.shape[1:].")
    out_shape: tuple[Size, ...] = Field(description="Per-sample output shape, f(x).shape[1:].")
    dtype: str = Field(description="dtype of x, e.g. 'float32'.")
    device: str = Field(description="Device type of x: 'cpu', 'cuda', ...")
    device_name: str = Field(description="Model name of the device, e.g. the GPU's or the CPU's.")
    create_graph: bool = Field(default=False, description="Whether results are differentiable.")
    call: str = Field(default="", description="How f is called beyond f(x): extra arguments' structure, "
                                               "several inputs, chosen coordinates, auxiliary outputs.")
    tuned_batch: Size | None = Field(
        default=None, description="The batch size the plan was tuned at, when it is reused for another "
                                  "within a factor of 2 (not timed at this one).")
    activations: Size = Field(default=0, description="Bytes f saves for backward over the whole batch.")
    family: str = Field(default="", pattern=r"^([0-9a-f]{32})?$",
                        description="Hash of the signature without the batch size: plans of one family differ in B.")
    fn_name: str = Field(description="Readable name of f (its qualified name or class).")
    fingerprint: str = Field(description="Hash of f's code and structure (not its weights).")
    torch_version: str = Field(description="torch.__version__ that made the plan.")
    autojac_version: str = Field(description="autojac.__version__ that made the plan.")
    threads: Count = Field(ge=1, description="torch.get_num_threads() when the plan was made.")
    tuning_seconds: Seconds = Field(description="Wall time spent probing and tuning.")
    created: Created = Field(default_factory=_now, description="When the plan was made (UTC).")

    @property
    def label(self) -> str:
        """The winner's candidate label, as used in `timings` and `excluded`."""
        return candidate_label(self.strategy, self.chunk)

    def call_options(self) -> dict[str, object]:
        """The options of the call that tell this plan from others of the same operation, f and
        shapes, where they differ from their defaults: create_graph=True, and any field that plans
        gain for their calls (every field but those of `_NOT_OPTIONS`)."""
        fields = type(self).model_fields
        return {name: getattr(self, name) for name, info in fields.items() if name not in _NOT_OPTIONS
                and getattr(self, name) != info.get_default(call_default_factory=True)}

    def options_text(self) -> str:
        """`call_options` in a few words: 'create_graph', 'dims=(0,1)'; empty when all are default."""
        return " ".join(name if value is True else f"{name}={_compact(value)}"
                        for name, value in self.call_options().items())

    def summary(self, width: int = 160) -> str:
        """A few readable lines: what won, how fast, what else was tried and why not."""
        how = self.how()
        shape = f"B={self.batch_size} in={self.in_shape} out={self.out_shape}"
        options = self.options_text()
        lines = [f"{self.op} of {self.fn_name} [{shape} {self.dtype} {self.device}{' ' + options if options else ''}]: "
                 f"{self.label} ({how})"]
        best = self.timings.get(self.label)
        for label, seconds in sorted(self.timings.items(), key=lambda kv: kv[1]):
            ratio = f"  x{seconds / best:.2f}" if best else ""
            lines.append(f"  {label:<28} {seconds * 1e3:10.3f} ms{ratio}")
        why = self.why_not_fastest()
        if why:
            lines.append(f"  {why}")
        # One line per reason: chunked variants and whole families often share one.
        grouped: dict[str, dict[str, list[int]]] = {}
        for label, why in self.excluded.items():
            name, chunk = parse_label(label)
            chunks = grouped.setdefault(why, {}).setdefault(name, [])
            if chunk is not None:
                chunks.append(chunk)
        for why, strategies in grouped.items():
            names = ", ".join(name + (f" (+chunk {', '.join(map(str, c))})" if c else "")
                              for name, c in strategies.items())
            text = why if len(why) <= width else why[: width - 3] + "..."
            lines.append(f"  excluded {names}: {text}")
        return "\n".join(lines)


    def how(self) -> str:
        """'tuned', 'tuned at B=512' (a plan reused for a batch size it was not timed at) or 'heuristic'."""
        if not self.tuned:
            return "heuristic"
        return "tuned" if self.tuned_batch is None else f"tuned at B={self.tuned_batch}"

    def why_not_fastest(self) -> str:
        """Why the winner won when a timed candidate was faster (the tuner's tie rule); else empty."""
        mine = self.timings.get(self.label)
        if mine is None or not self.timings:
            return ""
        fastest, best = min(self.timings.items(), key=lambda kv: kv[1])
        if fastest == self.label or best >= mine:
            return ""
        from .timing import TuneSettings  # timing imports this module

        head = (f"{self.label} won though {fastest} was faster (x{mine / best:.2f}): medians within "
                f"{TuneSettings.tie_margin:.0%} of the fastest tie, and ties go to")
        ours, theirs = self.memory.get(self.label), self.memory.get(fastest)
        if ours is not None and theirs is not None and ours < theirs:
            return f"{head} the lower memory estimate ({format_bytes(ours)} against {format_bytes(theirs)})"
        (name, chunk), (rival, _) = parse_label(self.label), parse_label(fastest)
        order = list(self.memory)  # the candidates, in heuristic order
        if ours is not None and ours == theirs:
            if name != rival and order.index(self.label) < order.index(fastest):
                return f"{head} the lower memory estimate, then the heuristic order: {name} comes before {rival}"
            if name == rival:
                form = "the whole basis" if chunk is None else "the smaller chunk"
                return f"{head} the lower memory estimate, then the heuristic order, then {form}"
        return f"{head} the lower memory estimate, then the heuristic order"


# Plan fields that say what was measured, how and when the plan was made, or that listings show in
# places of their own; every other field describes the call and is shown by `Plan.call_options`.
_NOT_OPTIONS = frozenset({
    "key", "op", "strategy", "chunk", "timings", "spread", "excluded", "memory", "tuned", "batch_independent",
    "vmap_ok", "deterministic", "batch_size", "in_shape", "out_shape", "dtype", "device", "device_name", "fn_name",
    "fingerprint", "torch_version", "autojac_version", "threads", "tuning_seconds", "created", "tuned_batch",
    "activations", "family",
})


def _compact(value: object) -> str:
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return "(" + ",".join(map(_compact, items)) + ")"
    return str(value)


class PlanFile(BaseModel):
    """A file of plans: the user's cache, an exported file, or one shipped with an application."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["autojac-plans"] = Field(description="Always 'autojac-plans': what this file is.")
    format_version: int = Field(
        ge=1, le=2**31, description="Version of this layout; a reader skips files of another version."
    )
    entries: dict[Key, Plan] = Field(description="Plan.key -> plan, one per problem signature.")


def candidate_label(strategy: str, chunk: int | None) -> str:
    """`sum_rev` or `sum_rev[chunk=16]`: how a candidate is named in plans."""
    return strategy if chunk is None else f"{strategy}[chunk={chunk}]"


def parse_label(label: str) -> tuple[str, int | None]:
    """Inverse of `candidate_label`; raises ValueError on a malformed chunk."""
    if not label.endswith("]") or "[chunk=" not in label:
        return label, None
    name, _, rest = label.partition("[chunk=")
    text = rest[:-1]
    if not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"strategy {label!r} has a bad chunk {text!r}; expected a positive integer, "
            f"e.g. '{name}[chunk=16]'"
        )
    return name, int(text)
