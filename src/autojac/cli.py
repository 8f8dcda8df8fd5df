"""The command line: `autojac COMMAND` or `python -m autojac COMMAND`.

Exit codes: 0 ok, 1 failure, 2 usage error (bad arguments, a module or attribute that cannot be
found); errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from ._version import __version__

if TYPE_CHECKING:
    from .models import Op

DTYPES = ("float32", "float64", "float16", "bfloat16")


class UsageError(Exception):
    """A mistake in the command line: exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"autojac: error: {message} (see: {self.prog} --help)\n")


# -- commands ---------------------------------------------------------------------------------

def _demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(min_time=args.min_time)
    return 0


def _plans(args: argparse.Namespace) -> int:
    from . import manage

    if args.op is not None:
        _check_op(args.op)
    found = manage.plans(op=args.op, device=args.device)
    if args.json:
        print(json.dumps([plan.model_dump(mode="json") for plan in found], indent=1))
        return 0
    if not found:
        print(f"no plans (cache: {manage.cache_path()})")
        return 0
    # OPTIONS: what else tells plans of one operation, f and shape apart (create_graph, ...)
    rows = [("KEY", "OP", "FUNCTION", "B", "IN", "OUT", "DTYPE", "DEVICE", "OPTIONS", "STRATEGY", "TIME", "HOW",
             "CREATED (UTC)")]
    for plan in found:
        seconds = plan.timings.get(plan.label)
        rows.append((plan.key[:10], plan.op, plan.fn_name, str(plan.batch_size), _shape(plan.in_shape),
                     _shape(plan.out_shape), plan.dtype, plan.device, plan.options_text() or "-", plan.label,
                     "-" if seconds is None else f"{seconds * 1e3:.3f} ms", plan.how(),
                     plan.created.strftime("%Y-%m-%d %H:%M")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{_plans_count(len(found))} (cache: {manage.cache_path()})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from . import manage

    if ":" not in args.target:  # a key, or the start of one, of a stored plan
        return _explain_stored(args.target)
    if not args.input_shape:
        raise UsageError("explain MODULE:ATTR needs at least one --input-shape B,...")
    inputs = _inputs(args)
    f = _load(args)
    for x in inputs:
        for op in _ops(args):  # made as autojac.warm makes it, tuning as AUTOJAC_TUNE says
            plan = manage.warm(f, x, ops=(op,), create_graph=args.create_graph,
                               tune=False if args.no_tune else None)[0]
            print(plan.summary())
            print(f"  key {plan.key}, made {_when(plan.created)} with torch {plan.torch_version}")
    return 0


def _explain_stored(prefix: str) -> int:
    from .cache import unusable_reason
    from .manage import stored_plans

    found = [plan for plan in stored_plans() if plan.key.startswith(prefix.lower())]
    if not found:
        raise LookupError(f"no stored plan has a key starting with {prefix!r}; `autojac plans` lists them, or "
                          f"give MODULE:ATTR --input-shape B,... to make one")
    if len(found) > 1:
        raise LookupError(f"{len(found)} stored plans have keys starting with {prefix!r} "
                          f"({', '.join(p.key[:12] for p in found[:5])}); give more of the key")
    plan = found[0]
    print(plan.summary())
    print(f"  key {plan.key}, made {_when(plan.created)} with torch {plan.torch_version}, "
          f"autojac {plan.autojac_version}, {plan.threads} threads, {plan.tuning_seconds:.2f} s of tuning")
    reason = unusable_reason(plan)
    if reason:
        print(f"  not used here: {reason}")
    return 0


def _warm(args: argparse.Namespace) -> int:
    from . import manage
    from .progress import progress

    ops = _ops(args)
    inputs = _inputs(args)
    f = _load(args)
    total, done = len(inputs) * len(ops), 0
    with progress(total) as shown:  # a bar on a terminal (the `progress` extra), else plain lines
        for x in inputs:
            for op in ops:
                shown.start(f"{op} B={x.shape[0]} in={_shape(x.shape[1:])}")
                started = datetime.now(timezone.utc)
                plan = manage.warm(f, x, ops=(op,), create_graph=args.create_graph)[0]
                done += 1
                if plan.created < started:
                    how = f"stored already ({'tuned' if plan.tuned else 'heuristic'}, {_when(plan.created)})"
                elif plan.tuned:
                    how = f"tuned in {plan.tuning_seconds:.2f} s"
                else:
                    how = "heuristic"
                shown.done(f"[{done}/{total}] {op} of {plan.fn_name} B={plan.batch_size} in={_shape(plan.in_shape)} "
                           f"{plan.dtype} {plan.device}: {plan.label} ({how})")
    _check_stored(f"made {_plans_count(total)} but stored none")
    print(f"{_plans_count(total)} in {manage.cache_path() or 'memory'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from . import manage

    count = manage.export_plans(args.path)
    print(f"exported {_plans_count(count)} to {args.path}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from . import manage

    counts = manage.import_plans(args.path)
    _check_stored("nothing was imported")
    print(f"imported {args.path} into {manage.cache_path()}: {counts}")
    return 0


def _check_stored(otherwise: str) -> None:
    """Fail (exit 1) if the plan cache could not be written: CI must not pass without its plans."""
    from .cache import DiskStore, EnvironmentStore
    from .planner import default_planner

    store = default_planner().store
    if isinstance(store, EnvironmentStore):
        store = store.current
    if isinstance(store, DiskStore) and not store.writable:
        raise OSError(f"could not write the plan cache in {store.directory}; {otherwise} "
                      f"(set AUTOJAC_CACHE_DIR to a writable directory)")


def _clear(args: argparse.Namespace) -> int:
    from . import manage

    count = manage.clear_cache()
    print(f"removed {_plans_count(count)} from {manage.cache_path()}")
    return 0


def _path(args: argparse.Namespace) -> int:
    from . import manage

    print(manage.cache_path())
    return 0


def _schema(args: argparse.Namespace) -> int:
    from .cache import schema_text

    text = schema_text()
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote the plan file schema to {args.output}")
    return 0


# -- arguments --------------------------------------------------------------------------------

def _shape_argument(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; expected sizes like 32,5 (batch first)") from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r} has a size below 1; every size must be positive")
    return sizes


def _device_argument(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; e.g. cpu, cuda, cuda:1") from None
    return text


def _add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", type=_shape_argument, metavar="B,...",
                        help="shape of x, batch first, e.g. 32,5; repeat for several shapes")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of x (default float32)")
    parser.add_argument("--device", type=_device_argument, default="cpu", help="device of x (default cpu)")
    parser.add_argument("--op", action="append", metavar="OP",
                        help="operation (default jacobian); repeat for several")
    parser.add_argument("--create-graph", action="store_true", help="plan for create_graph=True")
    parser.add_argument("--eval", action="store_true", help="call .eval() on the module first")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autojac", description="Autotuned per-sample derivatives for PyTorch.")
    parser.add_argument("--version", action="version", version=f"autojac {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log tuning: what is tuned and what won (-v, INFO), each candidate (-vv, DEBUG)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="tune real examples and show what won, why, and the speed-ups")
    demo.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per contender")
    demo.set_defaults(handler=_demo)

    plans = commands.add_parser("plans", help="list the stored plans")
    plans.add_argument("--op", help="only plans of this operation")
    plans.add_argument("--device", type=_device_argument, help="only plans of this device type (cpu, cuda, ...)")
    plans.add_argument("--json", action="store_true", help="JSON, one object per plan")
    plans.set_defaults(handler=_plans)

    explain = commands.add_parser("explain", help="show a plan: what won, how fast, what else was tried",
                                  description="TARGET is a stored plan's key (or its start), or MODULE:ATTR "
                                              "with --input-shape to make or look up the plan for it.")
    explain.add_argument("target", metavar="TARGET", help="KEY, or MODULE:ATTR (a callable or a factory)")
    _add_problem_arguments(explain)
    explain.add_argument("--no-tune", action="store_true", help="never benchmark (heuristic if not stored)")
    explain.set_defaults(handler=_explain)

    warm = commands.add_parser("warm", help="tune plans now, e.g. in CI, for the shapes given",
                               description="MODULE:ATTR is f (a callable taking x), or a factory called "
                                           "with no arguments that returns f (a class, a function).")
    warm.add_argument("target", metavar="MODULE:ATTR")
    _add_problem_arguments(warm)
    warm.set_defaults(handler=_warm)

    export = commands.add_parser("export", help="write every stored plan to a file, to ship")
    export.add_argument("path", metavar="PATH")
    export.set_defaults(handler=_export)

    import_ = commands.add_parser("import", help="merge a plan file into the cache (newer tuned plans win)")
    import_.add_argument("path", metavar="PATH")
    import_.set_defaults(handler=_import)

    commands.add_parser("clear", help="remove every plan from the cache").set_defaults(handler=_clear)
    commands.add_parser("path", help="print the cache file's path").set_defaults(handler=_path)
    schema = commands.add_parser("schema", help="print the JSON Schema of plan files")
    schema.add_argument("-o", "--output", metavar="PATH", help="write it to PATH instead")
    schema.set_defaults(handler=_schema)
    return parser


# -- MODULE:ATTR and inputs -------------------------------------------------------------------

def load_target(spec: str) -> Any:
    """The object named by MODULE:ATTR (ATTR may be dotted); the current directory is importable."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{spec!r} is not MODULE:ATTR, e.g. mypackage.models:make_model")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise UsageError(f"cannot import {module_name!r}: no module named {error.name!r} "
                             f"(is it on PYTHONPATH, or in the current directory?)") from None
        raise
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return obj


def as_function(obj: Any) -> Callable[..., Any]:
    """f itself, or what a zero-argument factory (a class, a function) returns."""
    from torch import nn

    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UsageError(f"{type(obj).__name__} object is not callable; point at f or at a factory of f")
    if not _takes_no_arguments(obj):
        if isinstance(obj, type):
            raise UsageError(f"{obj.__name__}() needs arguments; point at a zero-argument factory instead")
        return obj
    made = obj()
    if not callable(made):
        raise UsageError(f"{getattr(obj, '__name__', obj)!r}() returned a {type(made).__name__}, not a callable")
    return made


def _takes_no_arguments(obj: Any) -> bool:
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: treat it as f
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _load(args: argparse.Namespace) -> Callable[..., Any]:
    import torch
    from torch import nn

    f = as_function(load_target(args.target))
    if isinstance(f, nn.Module):
        f = f.to(device=args.device, dtype=getattr(torch, args.dtype))
        if args.eval:
            f.eval()
    return f


def _inputs(args: argparse.Namespace) -> list[Any]:
    import torch

    if not args.input_shape:
        raise UsageError("give at least one --input-shape B,... (batch first)")
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=generator, dtype=getattr(torch, args.dtype)).to(args.device)
            for shape in args.input_shape]


def _ops(args: argparse.Namespace) -> list[Op]:
    ops: list[Op] = args.op or ["jacobian"]  # checked below
    for op in ops:
        _check_op(op)
    return ops


def _check_op(op: str) -> None:
    from .manage import operations

    if op not in operations():
        raise UsageError(f"unknown operation {op!r} for --op; known: {', '.join(operations())}")


def _plans_count(count: int) -> str:
    return f"{count} plan" if count == 1 else f"{count} plans"


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(shape)).replace(" ", "")


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    text = str(message).removeprefix("autojac: ")
    print(f"autojac: warning: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:  # autojac's records only: other libraries' stay at WARNING
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("autojac").setLevel(logging.INFO if args.verbose == 1 else logging.DEBUG)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.handler(args)
        except KeyboardInterrupt:
            return 130
        except UsageError as error:
            print(f"autojac: error: {error}", file=sys.stderr)
            return 2
        except Exception as error:  # one line on stderr, exit 1; tracebacks are for --verbose
            if args.verbose:
                raise
            # one line, but every line of it: NoCandidateError lists a reason per candidate
            first, *rest = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [""]
            text = " ".join([first, "; ".join(rest)]).strip()
            print(f"autojac: error: {type(error).__name__}: {text}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
