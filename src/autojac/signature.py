"""The problem signature: everything that changes which strategy wins, and its hash (the key).

Fingerprints of `f` cover code and structure, never weights: for an nn.Module its classes,
their forward code, hyperparameters (extra_repr), parameter and buffer shapes, and the public
attributes of modules of the user's own classes; for a function its qualified name, code,
defaults, and what it closes over or reads from its globals; for a bound method or a callable
object, the object's public attributes too. Containers (up to 32 items) are walked.

Values that select behaviour (bool, None, str, enum members) are part of the fingerprint
wherever f reads them. Numbers are part of it only where they are fixed when f is made
(defaults, closure cells, partial arguments): a number read from a global or an attribute
is often a step counter or a schedule, and making it part of the key would tune again on
every step. The training flags of every module reached are read on each call, since
`model.eval()` changes the answer.

The description is cached per function object. Every call walks what f reaches once more,
cheaply (object identities only), and describes f again when anything it reads was rebound:
a global, an attribute, a submodule swapped for another.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import platform
import types
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .models import FORMAT_VERSION

TORCH_VERSION = torch.__version__
_MAX_DEPTH = 4  # how far into closures, globals and attributes the walk goes (module trees: all the way)
_MAX_ITEMS = 32  # containers and attribute sets longer than this are not walked
_MAX_PARTS = 4096  # the walk stops here, so that f reaching a huge object graph stays cheap
_SWITCHES = (bool, str, type(None), enum.Enum)  # always part of the fingerprint
_NUMBERS = (int, float, complex)  # part of it only where fixed when f is made
_OPAQUE = (types.ModuleType, type, bytes, torch.device, torch.dtype)  # described by name, never walked


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
    torch_version: str = TORCH_VERSION
    format_version: int = FORMAT_VERSION

    @functools.cached_property
    def key(self) -> str:
        """Stable hex digest of every field: the on-disk cache key."""
        text = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class FnInfo:
    """What is known about f without running it."""

    name: str
    fingerprint: str
    module_refs: tuple[weakref.ref, ...]  # every nn.Module reached, held weakly
    state: tuple[Any, ...] = ()  # identities of what f reached when described (see _Walker)

    def modules(self) -> list[nn.Module]:
        """The live modules f reaches (parameters' devices, buffers to restore after tuning)."""
        return [m for m in (r() for r in self.module_refs) if m is not None]


class _Walker:
    """Walks f and what it reaches, in one of two modes that visit exactly the same things.

    With `rich`, `parts` collects readable text: the fingerprint is its hash. Without, `parts`
    collects object identities (and modules' training flags): a cheap token that changes when
    anything the fingerprint is made from is rebound, so that f must be described again.
    Containers and numbers read at call time add nothing themselves, so that a growing list of
    losses or a step counter changes neither.
    """

    def __init__(self, rich: bool) -> None:
        self.rich = rich
        self.parts: list[Any] = []
        self.modules: list[nn.Module] = []
        self._seen: set[int] = set()

    def emit(self, obj: Any, text: Callable[[], str]) -> None:
        """Add obj: its text to the fingerprint, its identity to the quick walk."""
        self.note(id(obj), text)

    def note(self, value: Any, text: Callable[[], str]) -> None:
        """Add a value that stands for itself in the quick walk (what a new object with the same
        value would not change: a tensor's shape, a switch's value)."""
        if len(self.parts) < _MAX_PARTS:
            self.parts.append(text() if self.rich else value)

    def labelled(self, label: Any, text: Callable[[], str], visit: Callable[[], None]) -> None:
        """Run `visit`; if it added anything, put the label in front of it."""
        mark = len(self.parts)
        visit()
        if len(self.parts) > mark:
            self.parts.insert(mark, text() if self.rich else id(label))

    def value(self, obj: Any, depth: int, fixed: bool = False) -> None:
        """Visit obj; `fixed` when it was bound as f was made (a default, a closure cell)."""
        if len(self.parts) >= _MAX_PARTS:
            return
        if isinstance(obj, _SWITCHES) or (fixed and isinstance(obj, _NUMBERS)):
            self.note((type(obj), obj), lambda: repr(obj)[:200])
        elif isinstance(obj, _NUMBERS):
            pass  # read at call time: a counter or a schedule, not part of the problem
        elif isinstance(obj, Tensor):  # a new tensor of the same shape (a stashed activation) changes nothing
            self.note((obj.shape, obj.dtype), lambda: f"tensor{tuple(obj.shape)}{obj.dtype}")
        elif isinstance(obj, _OPAQUE):
            self.emit(obj, lambda: repr(obj)[:200])
        elif isinstance(obj, (tuple, list, dict)):
            if len(obj) <= _MAX_ITEMS and depth <= _MAX_DEPTH:
                items = obj.items() if isinstance(obj, dict) else enumerate(obj)
                for key, item in items:
                    self.labelled(key, lambda: f"[{_key_text(key)}]",
                                  lambda: self.value(item, depth + 1, fixed))
        elif id(obj) in self._seen or depth > _MAX_DEPTH:
            self.emit(obj, lambda: f"<ref {_qualname(type(obj))}>")
        else:
            self._seen.add(id(obj))
            self.reference(obj, depth)

    def reference(self, obj: Any, depth: int) -> None:
        if isinstance(obj, nn.Module):
            self.module(obj, depth)
        elif isinstance(obj, types.FunctionType):
            self.function(obj, depth)
        elif isinstance(obj, types.MethodType):
            self.emit(obj.__func__, lambda: f"method {obj.__func__.__qualname__}")
            self.value(obj.__self__, depth + 1)
            self.value(obj.__func__, depth + 1)
        elif isinstance(obj, functools.partial):
            self.emit(obj, lambda: "partial")
            self.value(obj.func, depth + 1)
            self.value(obj.args, depth + 1, fixed=True)
            self.value(obj.keywords, depth + 1, fixed=True)
        elif not hasattr(obj, "__dict__"):  # builtins, C types: nothing of theirs to walk
            self.emit(obj, lambda: f"builtin {getattr(obj, '__module__', '')}."
                                   f"{getattr(obj, '__qualname__', _qualname(type(obj)))}")
        else:  # an object: its class's __call__ and its public attributes
            self.emit(obj, lambda: f"object {_qualname(type(obj))}")
            call = getattr(type(obj), "__call__", None)
            if isinstance(call, types.FunctionType):
                self.value(call, depth + 1)
            self.attributes(obj, depth)

    def attributes(self, obj: Any, depth: int) -> None:
        public = [(name, attr) for name, attr in vars(obj).items() if not name.startswith("_") and name != "training"]
        if len(public) <= _MAX_ITEMS:
            for name, attr in public:
                self.labelled(name, lambda: f".{name}", lambda: self.value(attr, depth + 1))

    def module(self, module: nn.Module, depth: int) -> None:
        # Module trees are walked whole whatever their depth: their structure decides the plan.
        if not self.rich:
            self.module_identities(module, depth)
            return
        cls = type(module)
        self.modules.append(module)
        self.emit(module, lambda: f"{_qualname(cls)}({module.extra_repr()})")
        self.parts.append(_hook_text(module))
        for name, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None:
                self.emit(tensor, lambda: f"{name}{tuple(tensor.shape)}{tensor.dtype}")
        if _user_class(cls):
            forward = getattr(cls, "forward", None)
            if isinstance(forward, types.FunctionType):
                self.emit(forward.__code__, lambda: _code_digest(forward.__code__))
            self.attributes(module, depth)
        for name, child in module._modules.items():
            if child is None:
                continue
            self.emit(name, lambda: f"/{name}")
            if id(child) in self._seen:
                self.emit(child, lambda: f"<ref {_qualname(type(child))}>")
            else:
                self._seen.add(id(child))
                self.module(child, depth)

    def module_identities(self, root: nn.Module, depth: int) -> None:
        """The quick walk's part of `module`, on every call: each module's identity and training
        flag, in a fixed order (tensors are not followed: a swapped module is, a swapped weight
        is not)."""
        parts, modules, seen = self.parts, self.modules, self._seen
        stack = [root]
        while stack:
            module = stack.pop()
            modules.append(module)
            parts.append(id(module))
            parts.append(module.training)
            parts.append(len(module._forward_hooks) + len(module._forward_pre_hooks))
            if _user_class(type(module)):
                self.attributes(module, depth)
            for child in module._modules.values():
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)

    def function(self, f: types.FunctionType, depth: int) -> None:
        code = f.__code__
        self.emit(code, lambda: f"fn {f.__module__}.{f.__qualname__} {_code_digest(code)}")
        self.value(f.__defaults__ or (), depth + 1, fixed=True)
        self.value(f.__kwdefaults__ or {}, depth + 1, fixed=True)
        for name, cell in zip(code.co_freevars, f.__closure__ or ()):
            self.labelled(name, lambda: f"free {name}", lambda: self.value(_cell_value(cell), depth + 1, fixed=True))
        for name in _global_names_cached(code):
            obj = f.__globals__.get(name, _MISSING)
            if obj is not _MISSING and not isinstance(obj, (types.ModuleType, type)):  # imports, classes: code
                self.labelled(name, lambda: f"global {name}", lambda: self.value(obj, depth + 1))


_MISSING = object()


@functools.lru_cache(maxsize=None)
def _user_class(cls: type) -> bool:
    """Whether a module class is the user's own (its forward code and attributes are walked)."""
    return not cls.__module__.startswith("torch.")


def _key_text(key: Any) -> str:
    return repr(key)[:100] if isinstance(key, (*_SWITCHES, *_NUMBERS)) else _qualname(type(key))


def _walk(f: Any, rich: bool) -> _Walker:
    walker = _Walker(rich)
    if not rich and isinstance(f, nn.Module):  # the common case, on every call: straight to the modules
        walker._seen.add(id(f))
        walker.module_identities(f, 0)
    else:
        walker.value(f, 0)
    if walker.modules:  # global hooks run around every module's forward
        count = len(nn.modules.module._global_forward_hooks) + len(nn.modules.module._global_forward_pre_hooks)
        walker.parts.append(f"global hooks {count}" if rich else count)
    return walker


def _hook_text(module: nn.Module) -> str:
    """Forward hooks can change what a module computes (and rule out the forward strategies)."""
    hooks, pre = len(module._forward_hooks), len(module._forward_pre_hooks)
    return f"hooks {hooks}+{pre}" if hooks or pre else ""


def identity_state(f: Callable[..., Any]) -> tuple[Any, ...]:
    """The identities (and modules' training flags and hook counts) of what f reaches: equal on two
    calls when nothing f reads was rebound, so that a plan found for the first serves the second."""
    return tuple(_walk(f, rich=False).parts)


def weak_slot(f: Any, table: weakref.WeakKeyDictionary, make: bool) -> tuple[dict | None, Any]:
    """The dict kept for f in `table` (weakly: f's death drops it; made if `make`), and f's key in
    it; bound methods are new objects on every access, so theirs is kept under their object.
    (None, None) when there is none, or f cannot be referenced weakly."""
    owner, name = (f.__self__, f.__func__) if isinstance(f, types.MethodType) else (f, None)
    try:
        return (table.setdefault(owner, {}) if make else table.get(owner)), name
    except TypeError:
        return None, None


def describe(f: Callable[..., Any]) -> FnInfo:
    """Name, fingerprint and modules of f, made again only when something f reads was rebound."""
    return _describe(f, _walk(f, rich=False))[0]


def _describe(f: Any, quick: _Walker) -> tuple[FnInfo, tuple[bool, ...]]:
    """f's description given this call's identity walk, and the training flags of its modules."""
    state = tuple(quick.parts)
    slot, name = weak_slot(f, _DESCRIPTIONS, make=True)
    info = slot.get(name) if slot is not None else None  # not weakly referenceable: every call
    if info is None or info.state != state:
        walker = _walk(f, rich=True)
        digest = hashlib.sha256("\x1f".join(map(str, walker.parts)).encode()).hexdigest()[:16]
        info = FnInfo(_readable_name(f), digest, tuple(weakref.ref(m) for m in walker.modules), state)
        if slot is not None:
            slot[name] = info
    return info, tuple(m.training for m in quick.modules)


_DESCRIPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


@functools.lru_cache(maxsize=1024)
def _global_names_cached(code: types.CodeType) -> tuple[str, ...]:
    return tuple(_global_names(code))


def clear_descriptions() -> None:
    """Forget cached descriptions (after editing a function's code in place, say)."""
    _DESCRIPTIONS.clear()


def signature(op: str, f: Callable[..., Any], x: Tensor, *, create_graph: bool = False,
              batch_independent: bool | None = None) -> Signature:
    """The signature of applying `op` to f at a batch shaped like x."""
    info, training = _describe(f, _walk(f, rich=False))
    return Signature(
        op=op, in_shape=tuple(x.shape[1:]), batch=x.shape[0], dtype=dtype_name(x.dtype),
        device=x.device.type, device_name=device_name(x.device), create_graph=create_graph,
        batch_independent=batch_independent, fn_name=info.name, fingerprint=info.fingerprint,
        training=training,
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


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _readable_name(f: Any) -> str:
    if isinstance(f, nn.Module):
        return type(f).__name__
    if isinstance(f, functools.partial):
        return f"partial({_readable_name(f.func)})"
    name = getattr(f, "__qualname__", None) or type(f).__qualname__
    module = getattr(f, "__module__", None)
    return f"{module}.{name}" if module and module != "__main__" else name


def _code_digest(code: types.CodeType) -> str:
    parts = [code.co_code.hex(), repr(code.co_names)]
    for const in code.co_consts:
        parts.append(_code_digest(const) if isinstance(const, types.CodeType) else repr(const)[:200])
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return sorted(set(names))
