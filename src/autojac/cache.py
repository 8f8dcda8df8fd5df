"""Plans on disk: the user's cache file, and read-only plan files shipped with an application.

One JSON file per cache directory and format version (`plans-v1.json`), validated by the
pydantic model `PlanFile`. It is read once per process (again only on a miss, if another
process has replaced it since), then served from memory. Every write takes a file lock,
re-reads the file, merges what other processes wrote meanwhile, and replaces the file
atomically (temporary file, fsync, rename): many processes tuning at once lose no plan, and
no reader ever sees half a file.

A cache file is data, never code. Files over `MAX_FILE_BYTES` are refused unread; the text
is parsed once, by pydantic, whose JSON parser bounds nesting and numbers; every entry is
validated against `Plan`; and a plan is served only if its strategy is one the registry
knows for its operation, it was made by this torch version, and its recorded probes allow
its strategy. A cache file that does not parse is set aside (`*.corrupt-<time>`) with a
warning and a fresh one is started; a directory that cannot be created or written leaves
the store working from memory, with one warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
from pydantic import BaseModel, ValidationError

from . import config
from .errors import AutojacWarning, PlanFileError
from .models import FILE_FORMAT, FORMAT_VERSION, Plan, PlanFile
from .signature import TORCH_VERSION
from .store import MergeCounts, preferred, tally
from .strategies import registry
from .strategies.registry import BATCH_INDEPENDENT, VMAP
from .tuner import caller_stacklevel

log = logging.getLogger("autojac")

FILE_NAME = f"plans-v{FORMAT_VERSION}.json"
# A plan is about 2 KB, so this holds some 15,000 plans; the store drops its oldest plans
# rather than grow past it, and refuses to read any plan file larger.
MAX_FILE_BYTES = 32 * 2**20
LOCK_TIMEOUT = 30.0  # seconds to wait for another process's write


@dataclass(frozen=True)
class LoadedPlans:
    """The valid entries of a plan file, and how many entries were not valid plans."""

    plans: dict[str, Plan]
    invalid: int = 0


class _Envelope(BaseModel):
    """A plan file's outer layer, with entries left unvalidated so each can be judged alone."""

    format: str
    format_version: int
    entries: dict[str, Any]


def read_plan_file(path: Path, max_bytes: int | None = None) -> LoadedPlans:
    """The plans in a plan file. Entries that are not valid plans, or are stored under a key
    other than their own, are counted and left out; a file that is unusable as a whole raises
    PlanFileError (FileNotFoundError if it does not exist)."""
    data = _read_bounded(path, MAX_FILE_BYTES if max_bytes is None else max_bytes)
    try:
        whole = PlanFile.model_validate_json(data)
    except ValidationError:
        pass  # judged again entry by entry below
    else:
        if whole.format_version == FORMAT_VERSION and all(key == plan.key for key, plan in whole.entries.items()):
            return LoadedPlans(dict(whole.entries))
    try:
        envelope = _Envelope.model_validate_json(data)
    except ValidationError as error:
        raise PlanFileError(f"{path} is not an autojac plan file: {_first_error(error)}") from None
    if envelope.format != FILE_FORMAT:
        raise PlanFileError(f"{path} is not an autojac plan file: its format is {envelope.format[:40]!r}, "
                            f"expected {FILE_FORMAT!r}")
    if envelope.format_version != FORMAT_VERSION:
        raise PlanFileError(f"{path} has plan format version {envelope.format_version}; this autojac reads "
                            f"version {FORMAT_VERSION}: export the plans again with this autojac")
    plans: dict[str, Plan] = {}
    invalid = 0
    for key, entry in envelope.entries.items():
        try:
            plan = Plan.model_validate(entry)
        except ValidationError as error:
            log.debug("plan file %s: entry %.40s is not a valid plan: %s", path, key, _first_error(error))
            invalid += 1
            continue
        if plan.key != key:
            invalid += 1
            continue
        plans[key] = plan
    return LoadedPlans(plans, invalid)


def write_plan_file(path: Path, plans: Iterable[Plan]) -> None:
    """Write a plan file to ship (readable by all), atomically: temporary file, fsync, rename."""
    path = Path(path)
    try:
        write_atomically(path, _file_bytes(plans), private=False)
    except OSError as error:  # it would name the temporary file
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from None


def _file_bytes(plans: Iterable[Plan]) -> bytes:
    entries = {plan.key: plan for plan in plans}
    return PlanFile(format=FILE_FORMAT, format_version=FORMAT_VERSION, entries=entries).model_dump_json(
        indent=1).encode()


def write_atomically(path: Path, data: bytes, *, private: bool) -> None:
    """Temporary file in the same directory, fsync, rename over `path`; `private` keeps the
    temporary file's owner-only mode."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if not private:
            os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def unusable_reason(plan: Plan) -> str:
    """Why a stored plan must not be served here ("" when it may be)."""
    if plan.torch_version != TORCH_VERSION:
        return f"made with torch {plan.torch_version}; this is torch {TORCH_VERSION}"
    try:
        strategy = registry.get(plan.strategy, plan.op)
    except ValueError as error:
        return str(error)
    if BATCH_INDEPENDENT in strategy.needs and not plan.batch_independent:
        return f"its strategy {plan.strategy} needs a batch-independent f, and the plan says f is not"
    if VMAP in strategy.needs and not plan.vmap_ok:
        return f"its strategy {plan.strategy} needs vmap, and the plan says f does not run under it"
    if plan.create_graph and not strategy.differentiable:
        return f"its strategy {plan.strategy} cannot return a differentiable result"
    return ""


class DiskStore:
    """The user's plans in `directory`, plus read-only plan files (`shipped`) consulted after them.

    Implements the planner's PlanStore. Where the user's cache and a shipped file both hold a
    usable plan for a key, the preferred one wins (tuned, then newer); on a tie, the user's.
    """

    def __init__(self, directory: Path, shipped: Sequence[Path] = ()):
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.shipped = tuple(Path(p) for p in shipped)
        self.writable = True  # False once the directory proved unwritable: memory only
        self._lock = threading.RLock()
        # One lock object per store: it is reentrant, a second FileLock on the same file is not.
        self._file_lock = filelock.FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT)
        self._own: dict[str, Plan] = {}  # the user cache's plans, as last read, plus `_pending`
        self._pending: dict[str, Plan] = {}  # stored in memory, not yet written to disk
        self._from_shipped: dict[str, Plan] = {}
        self._loaded = False
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime) of the file last read

    # -- the PlanStore protocol ---------------------------------------------------------------

    def get(self, key: str) -> Plan | None:
        """The best usable plan for key; on a miss, reads the file again if another process
        has replaced it since."""
        with self._lock:
            self._load()
            plan = self._best(key)
            if plan is None and self._seen != _identity(self.path):
                self._refresh()
                plan = self._best(key)
            return plan

    def put(self, plan: Plan) -> None:
        self.merge([plan])

    def merge(self, plans: Iterable[Plan]) -> MergeCounts:
        """Store plans by `preferred` and write them to disk, merged with what is there now."""
        incoming = list(plans)
        with self._lock:
            self._load()
            self._pending, _ = tally(self._pending, incoming)
            merged, counts = tally(self._own, incoming)
            if self.writable:
                def update(on_disk: dict[str, Plan]) -> dict[str, Plan]:
                    nonlocal counts
                    _, counts = tally(on_disk, incoming)
                    return tally(on_disk, self._pending.values())[0]

                self._locked_write(update, "writing plans to")
            if self._pending:  # not written (memory only, or the lock was busy)
                self._own = merged
            return counts

    def plans(self) -> list[Plan]:
        """Every usable plan, the best one per key."""
        with self._lock:
            self._load()
            keys = {**self._from_shipped, **self._own}
            return [plan for plan in map(self._best, keys) if plan is not None]

    def clear(self) -> int:
        """Forget every plan of the user cache, on disk too (shipped files are left alone);
        returns how many there were."""
        with self._lock:
            self._load()
            count = len(self._own)
            if self.writable:
                def update(on_disk: dict[str, Plan]) -> dict[str, Plan]:
                    nonlocal count
                    count = len(tally(on_disk, self._pending.values())[0])
                    return {}

                self._locked_write(update, "clearing")
            self._own, self._pending = {}, {}
            return count

    def family(self, family: str) -> list[Plan]:
        """The usable tuned plans of one signature family (plans that differ only in B), each tuned
        at its own batch size."""
        with self._lock:
            self._load()
            keys = {**self._from_shipped, **self._own}
            found = [self._best(key) for key, plan in keys.items() if plan.family == family]
            return [plan for plan in found if plan is not None and plan.tuned and plan.tuned_batch is None]

    def stored(self) -> list[Plan]:
        """Every valid plan known, usable here or not (plans of other torch versions, of
        strategies this autojac lacks): what an export carries."""
        with self._lock:
            self._load()
            return list({**self._from_shipped, **self._own}.values())

    # -- reading ------------------------------------------------------------------------------

    def _best(self, key: str) -> Plan | None:
        best = None
        for plan in (self._own.get(key), self._from_shipped.get(key)):
            if plan is not None and not unusable_reason(plan):
                best = preferred(best, plan)
        return best

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for path in self.shipped:
            try:
                loaded = read_plan_file(path)
            except (OSError, PlanFileError) as error:
                _warn(f"autojac: ignoring the plan file {path} (AUTOJAC_PLANS): {_describe(error)}")
                continue
            if loaded.invalid:
                _warn(f"autojac: {loaded.invalid} entries of the plan file {path} are not valid plans; ignored")
            self._from_shipped = tally(self._from_shipped, loaded.plans.values())[0]
        self._refresh()

    def _refresh(self) -> None:
        """Read the user's cache file again, keeping the plans not yet written."""
        on_disk = self._read_own()
        if on_disk is not None:
            self._own = tally(on_disk, self._pending.values())[0]

    def _read_own(self) -> dict[str, Plan] | None:
        """The cache file's plans ({} if there is none); a corrupt file is set aside. None when
        it cannot be read at all (the store then keeps what it has in memory)."""
        identity = _identity(self.path)
        try:
            loaded = read_plan_file(self.path)
        except (FileNotFoundError, NotADirectoryError):
            self._seen = identity
            return {}
        except PlanFileError as error:
            self._seen = identity  # not parsed again until it changes
            return self._set_aside(str(error))
        except OSError as error:
            self._seen = identity
            self._give_up(f"cannot read the plan cache {self.path}: {_describe(error)}")
            return None
        if loaded.invalid and identity != self._seen:  # once per version of the file, not per read
            _warn(f"autojac: {loaded.invalid} entries of the plan cache {self.path} are not valid plans; "
                  f"ignored (they are dropped at the next write)")
        self._seen = identity
        return loaded.plans

    def _set_aside(self, why: str) -> dict[str, Plan] | None:
        """Rename a corrupt cache file out of the way, unless another process already did."""
        if not self.writable:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
        try:
            with self._file_lock:
                try:  # another process may have set it aside and started afresh meanwhile
                    loaded = read_plan_file(self.path)
                    self._seen = _identity(self.path)
                    return loaded.plans
                except (FileNotFoundError, PlanFileError):
                    pass
                if self.path.exists():
                    os.replace(self.path, target)
                    _warn(f"autojac: the plan cache could not be used ({why}); moved it to {target} and "
                          f"started a fresh one")
                self._seen = _identity(self.path)
                return {}
        except (OSError, filelock.Timeout) as error:
            self._give_up(f"the plan cache is not usable ({why}) and could not be set aside: {_describe(error)}")
            return None

    # -- writing ------------------------------------------------------------------------------

    def _locked_write(self, update: Callable[[dict[str, Plan]], dict[str, Plan]], doing: str) -> None:
        """Under the file lock: read the file, `update(plans on disk) -> plans`, write the result."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._file_lock:
                on_disk = self._read_own()
                if on_disk is None:
                    return
                plans = update(on_disk)
                if plans == on_disk:  # nothing new: no write (and no empty file where there was none)
                    self._own, self._pending = plans, {}
                    return
                data = _file_bytes(plans.values())
                if len(data) > MAX_FILE_BYTES:
                    plans = _pruned(plans, self.path)
                    data = _file_bytes(plans.values())
                write_atomically(self.path, data, private=True)
                self._seen = _identity(self.path)
                self._own, self._pending = plans, {}
        except filelock.Timeout:
            _warn(f"autojac: another process held the lock on {self.path} for {LOCK_TIMEOUT:g} s; "
                  f"plans are kept in memory and written next time")
        except OSError as error:
            self._give_up(f"cannot write the plan cache in {self.directory} ({doing} it): {_describe(error)}")

    def _give_up(self, why: str) -> None:
        """Work from memory from now on, saying so once."""
        if self.writable:
            self.writable = False
            _warn(f"autojac: {why}; plans are kept in memory only for this process. Set AUTOJAC_CACHE_DIR "
                  f"to a writable directory to keep them")


class EnvironmentStore:
    """The DiskStore the environment names at each moment: AUTOJAC_CACHE_DIR (else the user cache
    dir) and AUTOJAC_PLANS, looked up again on every use, so that a test suite's monkeypatch.setenv
    or a job that changes them within a process is followed by plans(), export, clear and writes."""

    def __init__(self) -> None:
        self._stores: dict[tuple[str | None, str | None], DiskStore] = {}
        self._lock = threading.Lock()

    @property
    def current(self) -> DiskStore:
        named = (os.environ.get("AUTOJAC_CACHE_DIR"), os.environ.get("AUTOJAC_PLANS"))
        store = self._stores.get(named)
        if store is None:
            with self._lock:
                store = self._stores.get(named)
                if store is None:
                    store = self._stores[named] = DiskStore(config.cache_dir(), config.shipped_plan_files())
        return store

    @property
    def path(self) -> Path:
        return self.current.path

    @property
    def shipped(self) -> tuple[Path, ...]:
        return self.current.shipped

    def get(self, key: str) -> Plan | None:
        return self.current.get(key)

    def put(self, plan: Plan) -> None:
        self.current.put(plan)

    def merge(self, plans: Iterable[Plan]) -> MergeCounts:
        return self.current.merge(plans)

    def plans(self) -> list[Plan]:
        return self.current.plans()

    def clear(self) -> int:
        return self.current.clear()

    def family(self, family: str) -> list[Plan]:
        return self.current.family(family)

    def stored(self) -> list[Plan]:
        return self.current.stored()


def default_store() -> EnvironmentStore:
    """The store for the environment at each moment (see EnvironmentStore)."""
    return EnvironmentStore()


def schema_text() -> str:
    """The JSON Schema of plan files, as checked in at the repository root (cache_schema.json)."""
    return json.dumps(PlanFile.model_json_schema(), indent=2, sort_keys=True) + "\n"


def _pruned(plans: dict[str, Plan], path: Path) -> dict[str, Plan]:
    """Drop the least preferred plans (heuristic, then oldest) until the file fits MAX_FILE_BYTES."""
    sizes = {key: len(plan.model_dump_json(indent=1)) + 64 for key, plan in plans.items()}
    total = sum(sizes.values())
    kept = dict(plans)
    for key in sorted(plans, key=lambda k: (plans[k].tuned, plans[k].created)):
        if total <= MAX_FILE_BYTES * 0.9:
            break
        total -= sizes[key]
        del kept[key]
    _warn(f"autojac: the plan cache {path} reached its limit of {MAX_FILE_BYTES / 2**20:g} MB; dropped the "
          f"{len(plans) - len(kept)} oldest plans")
    return kept


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, refusing (unread) anything larger than max_bytes."""
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    info = os.fstat(handle)  # before fdopen, which refuses a directory with an unhelpful message
    if not stat.S_ISREG(info.st_mode):
        os.close(handle)
        raise PlanFileError(f"{path} is not a regular file")
    with os.fdopen(handle, "rb") as stream:
        if info.st_size > max_bytes:
            raise PlanFileError(f"{path} is {info.st_size / 2**20:.1f} MB, over the limit of "
                                f"{max_bytes / 2**20:.1f} MB for a plan file")
        data = stream.read(max_bytes + 1)  # the file may have grown since fstat
    if len(data) > max_bytes:
        raise PlanFileError(f"{path} is over the limit of {max_bytes / 2**20:.1f} MB for a plan file")
    return data


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); where directories cannot be opened, skip it."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _first_error(error: ValidationError) -> str:
    first = error.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where + ': ' if where else ''}{first['msg']}"[:300]


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, PlanFileError) else f"{type(error).__name__}: {error}"


def _warn(message: str) -> None:
    warnings.warn(message, AutojacWarning, stacklevel=caller_stacklevel())
