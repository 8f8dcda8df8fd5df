"""The problem signature: everything that changes which strategy wins, and its hash (the key).

Fingerprints of `f` cover code and structure, never weights or data: for an nn.Module its
classes, their methods' code and the globals those read, hyperparameters (extra_repr and every
public attribute of torch's own modules, `batch_first` say), parameter and buffer shapes, hooks,
and the public attributes of modules of the user's own classes; for a function its qualified
name, code, and what it closes over or reads from its globals; for a bound method or a callable
object, the object's public attributes too. Containers are walked.

Switches (bool, None, str, enum members) are part of the fingerprint wherever f reads them:
they select behaviour, as do integers bound when f is made (a default, a closure cell, a
`functools.partial` argument: a `dim`, a size). Other numbers are not (except torch's own modules'
hyperparameters, such as Dropout's p): a step counter or a learning-rate schedule read at call
time, an ODE time or a scale captured by a closure or a partial must not make a new plan. Nor are tensors: a captured tensor, a stashed
activation or a list of losses is data. What the key leaves out is guarded by cheap checks
instead (trust.py): a new f holding tensors is checked for batch coupling once, and every plan's
batch independence is checked again at spaced calls.

The description is cached per function object with `Guards`: what to compare on each call to
know that nothing the description was made from was rebound (a global, a closure cell, an
attribute of a plain object; module trees are watched by watch.py). When a guard fails, f is
described again; the key changes only if the fingerprint does.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import platform
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import compiled, watch
from .models import FORMAT_VERSION

TORCH_VERSION = torch.__version__
_MAX_DEPTH = 4  # how far into closures, globals and attributes the walk goes (module trees: all the way)
_MAX_ITEMS = 256  # containers longer than this are not walked (attributes are, at any count)
_MAX_PARTS = 8192  # the walk stops here, so that f reaching a huge object graph stays cheap
_SWITCHES = (bool, str, type(None), enum.Enum)  # part of the fingerprint wherever they are read
_NUMBERS = (int, float, complex)  # data, except torch modules' hyperparameters
_OPAQUE = (types.ModuleType, type, bytes, torch.device, torch.dtype)  # described by name, never walked
_MISSING = object()


@dataclass(frozen=True)
class Signature:
    """Hashable description of one call; equal signatures share a plan."""

    op: str
    in_shape: tuple[int, ...]
    batch: int
    dtype: str
    device: str
    device_name: str
    create_graph: bool
    batch_independent: bool | None  # the caller's override; None means probed
    fn_name: str
    fingerprint: str
    training: tuple[bool, ...]  # training flags of the modules f reaches
    call: str = ""  # how f is called beyond f(x): extra arguments' structure, several inputs, dims, aux
    torch_version: str = TORCH_VERSION
    format_version: int = FORMAT_VERSION

    @functools.cached_property
    def key(self) -> str:
        """Stable hex digest of every field: the on-disk cache key."""
        return _digest(self._fields())

    @functools.cached_property
    def family(self) -> str:
        """Digest of every field but the batch size: plans of one family differ only in B."""
        fields = self._fields()
        del fields["batch"]
        return _digest(fields)

    def _fields(self) -> dict[str, Any]:
        # every field is a primitive or a tuple of them: no need for asdict's deep copies
        return {f.name: getattr(self, f.name) for f in _SIGNATURE_FIELDS}


def _digest(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_SIGNATURE_FIELDS = dataclasses.fields(Signature)


# Objects a guard keeps alive to compare by identity (they cannot refer back to f); others it
# holds weakly where it can, else by id.
_KEPT = (str, bytes, bool, type(None), enum.Enum)


def _expectation(obj: Any) -> tuple[int, Any]:
    """How a guard knows obj again: (0, obj) kept, (1, weakref), (2, id), or (3, a number's value:
    numbers are compared by value)."""
    if isinstance(obj, _KEPT):
        return 0, obj
    if isinstance(obj, _NUMBERS):
        return 3, obj
    try:
        return 1, weakref.ref(obj)
    except TypeError:
        return 2, id(obj)


def _met(current: Any, expectation: tuple[int, Any]) -> bool:
    kind, held = expectation
    if kind == 0:
        return current is held
    if kind == 1:
        return held() is current
    if kind == 3:
        return type(current) is type(held) and current == held
    return id(current) == held


@dataclass
class Guards:
    """What to compare on a call to know that f's description still holds: the watch epoch and
    the count of global hooks, and what sits in each slot the walk read through (a global, a
    closure cell, an attribute of a plain object, an item of a container, a class's method): the
    same object (held weakly where it can be, so that no guard keeps f alive), or for a number
    the same value. A change fails the guard, which costs a new description of f, not a plan."""

    epoch: int = 0
    hooks: int = 0
    maps: list[tuple[Any, Any, tuple[int, Any]]] = field(default_factory=list)  # (dict, key, expectation)
    attrs: list[tuple[Any, str, tuple[int, Any]]] = field(default_factory=list)  # (owner, weakly, name, ...)
    items: list[tuple[list[Any], int, tuple[int, Any]]] = field(default_factory=list)  # (list, index, ...)
    cells: list[tuple[types.CellType, tuple[int, Any]]] = field(default_factory=list)

    def hold(self) -> bool:
        if self.epoch != watch.epoch() or self.hooks != watch.global_hooks():
            return False
        for mapping, key, expected in self.maps:
            if not _met(mapping.get(key, _MISSING), expected):
                return False
        for owner, name, expected in self.attrs:
            target = owner() if isinstance(owner, weakref.ref) else owner
            if target is None or not _met(getattr(target, name, _MISSING), expected):
                return False
        for sequence, index, expected in self.items:
            if index >= len(sequence) or not _met(sequence[index], expected):
                return False
        for cell, expected in self.cells:
            if not _met(_cell_value(cell), expected):
                return False
        return True

    def extend(self, other: Guards) -> None:
        self.maps += other.maps
        self.attrs += other.attrs
        self.items += other.items
        self.cells += other.cells


@dataclass(frozen=True)
class FnInfo:
    """What is known about f without running it."""

    name: str
    fingerprint: str
    module_refs: tuple[weakref.ref[nn.Module], ...]  # every nn.Module reached, held weakly
    guards: Guards
    holds_tensors: bool = False  # f reaches tensors other than its modules' parameters and buffers
    # How often f was described again with the same fingerprint (data it reads changed): numbers that
    # keep changing (a step counter) stop being guarded after a few.
    data_changes: int = 0
    fixed: tuple[int, ...] = ()  # the ints bound when f was made (see _Walker.value)

    def modules(self) -> list[nn.Module]:
        """The live modules f reaches (parameters' devices, buffers to restore after tuning)."""
        return [m for m in (r() for r in self.module_refs) if m is not None]

    def training(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self.modules())


NUMBERS_GUARDED_UNTIL = 2  # data changes after which numbers read at call time are no longer guarded


class _Walker:
    """Walks f and what it reaches: readable text for the fingerprint (`parts`), the modules, the
    guards, and whether f holds tensors of its own."""

    def __init__(self, guard_numbers: bool = True) -> None:
        self.parts: list[str] = []
        self.modules: list[nn.Module] = []
        self.guards = Guards()
        self.holds_tensors = False
        self.fixed: list[int] = []  # ints bound when f was made (closure cells, defaults, partial arguments)
        self.guard_numbers = guard_numbers
        self._seen: set[int] = set()
        self._classes: set[type] = set()

    def add(self, text: str) -> None:
        if len(self.parts) < _MAX_PARTS:
            self.parts.append(text)

    def labelled(self, label: str, visit: Callable[[], None]) -> None:
        """Run `visit`; if it added anything, put the label in front of it."""
        mark = len(self.parts)
        visit()
        if len(self.parts) > mark:
            self.parts.insert(mark, label)

    def _guarded(self, obj: Any) -> bool:
        return self.guard_numbers or not isinstance(obj, _NUMBERS) or isinstance(obj, bool)

    def slot(self, mapping: Any, key: Any, label: str, depth: int, *, torch_hyper: bool = False,
             guard: bool = True, fixed: bool = False) -> None:
        """Visit what sits in mapping[key] (a global, an item of a dict), guarding the slot."""
        obj = mapping.get(key, _MISSING)
        if obj is _MISSING:
            return
        if guard and self._guarded(obj):
            self.guards.maps.append((mapping, key, _expectation(obj)))
        self.labelled(label, lambda: self.value(obj, depth, torch_hyper=torch_hyper, fixed=fixed))

    def value(self, obj: Any, depth: int, *, torch_hyper: bool = False, fixed: bool = False) -> None:
        """Visit obj; `torch_hyper` for a torch module's attribute (a hyperparameter), `fixed` for what
        was bound when f was made (a default, a closure cell, a partial's argument)."""
        if len(self.parts) >= _MAX_PARTS:
            return
        if obj is None:
            pass  # None is what an attribute holds before its data arrives (a stash): not a switch
        elif isinstance(obj, _SWITCHES) or (torch_hyper and isinstance(obj, _NUMBERS)):
            self.add(_switch_text(obj))
        elif isinstance(obj, _NUMBERS):
            # data: a counter or a schedule read at call time, an ODE time or a diffusion step captured.
            # An int bound when f was made may be structure too (a dim): the planner checks f again
            # when they change (Planner.entry), rather than making a new plan.
            if fixed and isinstance(obj, int):
                self.fixed.append(obj)
        elif isinstance(obj, Tensor):
            self.holds_tensors = self.holds_tensors or not isinstance(obj, nn.Parameter)
        elif isinstance(obj, _OPAQUE):
            self.add(_opaque_text(obj))
        elif isinstance(obj, (tuple, list, dict)):
            self.container(obj, depth, fixed)
        elif id(obj) in self._seen or depth > _MAX_DEPTH:
            self.add(f"<ref {_qualname(type(obj))}>")
        else:
            self._seen.add(id(obj))
            self.reference(obj, depth)

    def container(self, obj: tuple[Any, ...] | list[Any] | dict[Any, Any], depth: int,
                  fixed: bool = False) -> None:
        if len(obj) > _MAX_ITEMS or depth > _MAX_DEPTH:
            return
        if isinstance(obj, dict):
            for key in list(obj):
                self.slot(obj, key, f"[{_key_text(key)}]", depth + 1, fixed=fixed)
            return
        for index, item in enumerate(obj):
            if isinstance(obj, list) and self._guarded(item):
                self.guards.items.append((obj, index, _expectation(item)))
            self.labelled(f"[{index}]", functools.partial(self.value, item, depth + 1, fixed=fixed))

    def reference(self, obj: Any, depth: int) -> None:
        if isinstance(obj, nn.Module):
            self.reached_module(obj)
        elif isinstance(obj, types.FunctionType):
            self.function(obj, depth)
        elif isinstance(obj, types.MethodType):
            self.add(f"method {obj.__func__.__qualname__}")
            self.value(obj.__self__, depth + 1)
            self.value(obj.__func__, depth + 1)
        elif isinstance(obj, functools.partial):
            self.add("partial")
            self.value(obj.func, depth + 1)
            self.value(obj.args, depth + 1, fixed=True)
            self.value(obj.keywords, depth + 1, fixed=True)
        elif not hasattr(obj, "__dict__") and not _slot_names(_class_of(obj)):  # builtins, C types
            self.add(f"builtin {_canonical_module(getattr(obj, '__module__', '') or '')}."
                     f"{getattr(obj, '__qualname__', _qualname(type(obj)))}")
        else:  # an object: its class's methods and its public attributes (__slots__ too)
            cls = type(obj)
            self.add(f"object {_qualname(cls)}")
            self.methods(cls, depth)
            self.attributes(obj, depth)

    def attributes(self, obj: Any, depth: int, *, torch_hyper: bool = False) -> None:
        """Every public attribute of obj (the module machinery's own excepted); a module's are
        watched by watch.py, a plain object's are guarded (its owner held weakly where it can be)."""
        module = isinstance(obj, nn.Module)
        names = list(vars(obj)) if hasattr(obj, "__dict__") else []
        names += [n for n in _slot_names(_class_of(obj)) if n not in names]
        try:
            owner: Any = weakref.ref(obj)
        except TypeError:
            owner = obj
        for name in names:
            if name.startswith("_") or name == "training":
                continue
            attr = getattr(obj, name, _MISSING)
            if attr is _MISSING:
                continue
            if not module and self._guarded(attr):
                self.guards.attrs.append((owner, name, _expectation(attr)))
            self.labelled(f".{name}", functools.partial(self.value, attr, depth + 1, torch_hyper=torch_hyper))

    def methods(self, cls: type, depth: int) -> None:
        """The code of the methods a class of the user's defines (up to torch's and object's), and
        what they read (a module's forward reading a global switch, say); once per class, however
        many of its instances f reaches. A torch class is guarded by its forward alone."""
        if cls in self._classes:
            return
        self._classes.add(cls)
        for klass in cls.__mro__:
            if klass is object:
                break
            if _from_torch(klass):
                if "forward" in vars(klass):  # a patched torch forward is noticed, never walked
                    self.guards.maps.append((vars(klass), "forward", _expectation(vars(klass)["forward"])))
                    break
                continue
            for name, member in list(vars(klass).items()):
                function = getattr(member, "__func__", member)  # staticmethod, classmethod
                if isinstance(function, types.FunctionType):
                    self.guards.maps.append((vars(klass), name, _expectation(member)))
                    self.labelled(f"{klass.__qualname__}.{name}", functools.partial(self.value, function, depth + 1))

    def reached_module(self, module: nn.Module) -> None:
        """A module reached from a function or an object: its own description stands for it (cached
        with the module, so that a lambda made anew at every step is described in microseconds)."""
        info = describe(module)
        self.add(f"module {info.name} {info.fingerprint}")
        self.modules.extend(info.modules())
        self.guards.extend(info.guards)
        self.holds_tensors = self.holds_tensors or info.holds_tensors
        self.fixed.extend(info.fixed)

    def module(self, module: nn.Module) -> None:
        # Module trees are walked whole whatever their depth: their structure decides the plan.
        cls: type = type(module)  # plain `type`: mypy takes a Module class for unhashable
        self.modules.append(module)
        self.add(f"{_qualname(cls)}({module.extra_repr()}){_hook_text(module)}")
        for name, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None:
                self.add(f"{name}{tuple(tensor.shape)}{tensor.dtype}")
        self.methods(cls, 0)
        self.attributes(module, 0, torch_hyper=_from_torch(cls))
        for name, child in module._modules.items():
            if child is None:
                continue
            self.add(f"/{name}")
            if id(child) in self._seen:
                self.add(f"<ref {_qualname(type(child))}>")
            else:
                self._seen.add(id(child))
                self.module(child)

    def function(self, f: types.FunctionType, depth: int) -> None:
        code = f.__code__
        self.add(f"fn {_canonical_module(f.__module__)}.{f.__qualname__} {_code_digest(code)}")
        self.value(f.__defaults__ or (), depth + 1, fixed=True)
        self.value(f.__kwdefaults__ or {}, depth + 1, fixed=True)
        for name, cell in zip(code.co_freevars, f.__closure__ or ()):
            self.guards.cells.append((cell, _expectation(_cell_value(cell))))
            self.labelled(f"free {name}", functools.partial(self.value, _cell_value(cell), depth + 1, fixed=True))
        for name in _global_names(code):
            obj = f.__globals__.get(name, _MISSING)
            if obj is not _MISSING and not isinstance(obj, (types.ModuleType, type)):  # imports, classes: code
                self.slot(f.__globals__, name, f"global {name}", depth + 1)


def _class_of(obj: object) -> type:
    return type(obj)


@functools.lru_cache(maxsize=None)
def _slot_names(cls: type) -> tuple[str, ...]:
    """The attribute names a class's __slots__ declare, along its MRO."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in names:
                names.append(name)
    return tuple(names)


def _walk(f: Any, guard_numbers: bool = True) -> _Walker:
    watch.install()
    walker = _Walker(guard_numbers)
    walker.guards.epoch = watch.epoch()  # taken first: a change during the walk fails the guard later
    walker.guards.hooks = watch.global_hooks()
    if isinstance(f, nn.Module):  # the root module is walked whole; modules reached otherwise stand by their own
        walker._seen.add(id(f))
        walker.module(f)
    else:
        walker.value(f, 0)
    if walker.modules:  # global hooks run around every module's forward
        walker.add(f"global hooks {walker.guards.hooks}")
        watch.watch(walker.modules)
    return walker


@functools.lru_cache(maxsize=None)
def _from_torch(cls: type) -> bool:
    """Whether a class is torch's own (its code is torch's; its attributes are hyperparameters)."""
    return cls.__module__ == "torch" or cls.__module__.startswith("torch.")


def _switch_text(obj: Any) -> str:
    return repr(obj)[:200]


def _opaque_text(obj: Any) -> str:
    if isinstance(obj, type):
        return f"class {_qualname(obj)}"
    if isinstance(obj, types.ModuleType):
        return f"module {_canonical_module(obj.__name__)}"
    return repr(obj)[:200]


def _key_text(key: Any) -> str:
    return repr(key)[:100] if isinstance(key, (*_SWITCHES, *_NUMBERS)) else _qualname(type(key))


def _hook_text(module: nn.Module) -> str:
    """Hooks can change what a module computes (and rule out the forward strategies)."""
    counts = (len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks),
              len(module._backward_pre_hooks))
    return f" hooks {counts}" if any(counts) else ""


class WeakTable:
    """A dict per object, kept while the object lives (a WeakKeyDictionary by identity: faster on
    the hot path, and for objects that define __eq__)."""

    def __init__(self) -> None:
        self._slots: dict[int, tuple[weakref.ref[Any], dict[Any, Any]]] = {}

    def get(self, owner: Any) -> dict[Any, Any] | None:
        found = self._slots.get(id(owner))
        return found[1] if found is not None and found[0]() is owner else None

    def setdefault(self, owner: Any) -> dict[Any, Any]:
        slot = self.get(owner)
        if slot is None:
            key = id(owner)

            def forget(ref: weakref.ref[Any], slots: dict[int, Any] = self._slots) -> None:
                if slots.get(key, (None,))[0] is ref:  # not a newer object at the same address
                    del slots[key]

            slot = {}
            self._slots[key] = (weakref.ref(owner, forget), slot)  # TypeError if not weakly referenceable
        return slot

    def clear(self) -> None:
        self._slots.clear()


def weak_slot(f: Any, table: WeakTable, make: bool) -> tuple[dict[Any, Any] | None, Any]:
    """The dict kept for f in `table` (weakly: f's death drops it; made if `make`), and f's key in
    it; bound methods are new objects on every access, so theirs is kept under their object.
    (None, None) when there is none, or f cannot be referenced weakly."""
    owner, name = (f.__self__, f.__func__) if type(f) is types.MethodType else (f, None)
    if not make:
        return table.get(owner), name
    try:
        return table.setdefault(owner), name
    except TypeError:
        return None, None


def describe(f: Callable[..., Any]) -> FnInfo:
    """Name, fingerprint, modules and guards of f, made again only when a guard fails."""
    slot, name = weak_slot(f, _DESCRIPTIONS, make=True)
    info = slot.get(name) if slot is not None else None  # not weakly referenceable: every call
    if info is None:
        info = _same_function_described(f)
        if info is not None and slot is not None:
            slot[name] = info
    if info is None or not info.guards.hold():
        changes = info.data_changes if info is not None else 0
        walker = _walk(f, guard_numbers=changes < NUMBERS_GUARDED_UNTIL)
        digest = hashlib.sha256("\x1f".join(walker.parts).encode()).hexdigest()[:16]
        if info is not None and info.fingerprint == digest:
            changes += 1  # what changed is data (a number, an object the key leaves out)
        info = FnInfo(_readable_name(f), digest, tuple(weakref.ref(m) for m in walker.modules), walker.guards,
                      walker.holds_tensors, changes, tuple(walker.fixed))
        if slot is not None:
            slot[name] = info
        _remember_function(f, info)
    return info


# Descriptions of functions by code, so that a lambda made anew at every step over the same model
# (`autojac.jacobian(lambda z: model(z), x)`, an ODE step's `lambda z: f(t, z)`) is not described
# again: a new function object with the same code, globals and closure contents (a float captured,
# an ODE time, counts as the same: it is data) takes the description of the last one.
_BY_CODE: dict[tuple[Any, ...], tuple[tuple[tuple[int, Any], ...], FnInfo]] = {}
_BY_CODE_LIMIT = 256


def _code_key(f: Any) -> tuple[Any, ...] | None:
    if type(f) is not types.FunctionType or f.__defaults__ or f.__kwdefaults__:
        return None
    return f.__code__, id(f.__globals__)


def _cell_expectation(value: Any) -> tuple[int, Any] | None:
    """How a closure's content is recognized in another function (None: it cannot be, safely)."""
    if isinstance(value, _NUMBERS) and not isinstance(value, bool):
        return 4, type(value)  # data: any number will do (an int's value is FnInfo.fixed, checked by the planner)
    expectation = _expectation(value)
    return None if expectation[0] == 2 else expectation  # an id alone could be a dead object's


def _remember_function(f: Any, info: FnInfo) -> None:
    key = _code_key(f)
    if key is None:
        return
    expectations = tuple(_cell_expectation(_cell_value(c)) for c in f.__closure__ or ())
    if any(e is None for e in expectations) or _direct_ints(f) != info.fixed:
        return  # its ints bound when made are not all plain closure cells: describe such f each time
    if len(_BY_CODE) >= _BY_CODE_LIMIT:
        _BY_CODE.pop(next(iter(_BY_CODE)))
    _BY_CODE[key] = (expectations, info)  # type: ignore[assignment]


def _same_function_described(f: Any) -> FnInfo | None:
    key = _code_key(f)
    found = _BY_CODE.get(key) if key is not None else None
    if found is None:
        return None
    expectations, info = found
    cells = f.__closure__ or ()
    if len(cells) != len(expectations):
        return None
    for cell, (kind, held) in zip(cells, expectations):
        value = _cell_value(cell)
        if kind == 4:
            if type(value) is not held:
                return None
        elif not _met(value, (kind, held)):
            return None
    return dataclasses.replace(info, fixed=_direct_ints(f))


def _direct_ints(f: types.FunctionType) -> tuple[int, ...]:
    values = (_cell_value(c) for c in f.__closure__ or ())
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


_DESCRIPTIONS = WeakTable()


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def clear_descriptions() -> None:
    """Forget cached descriptions (after editing a function's code in place, say)."""
    _DESCRIPTIONS.clear()
    _BY_CODE.clear()


def signature(op: str, f: Callable[..., Any], x: Tensor, *, create_graph: bool = False,
              batch_independent: bool | None = None, call: str = "", info: FnInfo | None = None) -> Signature:
    """The signature of applying `op` to f at a batch shaped like x (`info`: f's description, if
    the caller has it)."""
    info = describe(f) if info is None else info
    return Signature(
        op=op, in_shape=tuple(x.shape[1:]), batch=x.shape[0], dtype=dtype_name(x.dtype),
        device=x.device.type, device_name=device_name(x.device), create_graph=create_graph,
        batch_independent=batch_independent, fn_name=info.name, fingerprint=info.fingerprint,
        training=info.training(), call=call,
    )


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The device's model name: the GPU's, or the CPU's from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_name()
    return device.type


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _canonical_module(name: str) -> str:
    """A module's name as importing it by path would give: `python train.py` runs train.py as
    `__main__`, but `autojac warm train:build` imports it as `train`, and both must find one plan."""
    if name != "__main__":
        return name
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    path = getattr(main, "__file__", None)
    if path:
        import os

        return os.path.splitext(os.path.basename(path))[0]
    return name


def _qualname(cls: type) -> str:
    return f"{_canonical_module(cls.__module__)}.{cls.__qualname__}"


def _readable_name(f: Any) -> str:
    if isinstance(f, nn.Module):
        return type(f).__name__
    if isinstance(f, functools.partial):
        return f"partial({_readable_name(f.func)})"
    name = getattr(f, "__qualname__", None) or type(f).__qualname__
    module = getattr(f, "__module__", None)
    return f"{module}.{name}" if module and module != "__main__" else name


@functools.lru_cache(maxsize=4096)
def _code_digest(code: types.CodeType) -> str:
    parts = [code.co_code.hex(), repr(code.co_names)]
    for const in code.co_consts:
        parts.append(_code_digest(const) if isinstance(const, types.CodeType) else _const_text(const))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _const_text(const: Any) -> str:
    """A code constant as text that does not depend on PYTHONHASHSEED (a set literal's order does)."""
    if isinstance(const, frozenset):
        return "frozenset{" + ",".join(sorted(_const_text(c) for c in const)) + "}"
    if isinstance(const, tuple):
        return "(" + ",".join(_const_text(c) for c in const) + ")"
    return repr(const)[:200]


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))
