"""The problem signature: everything that changes which strategy wins, and its hash (the key).

Fingerprints of `f` cover code and structure, never weights: for an nn.Module its classes,
their forward code, hyperparameters (extra_repr), parameter and buffer shapes; for a
function its qualified name, code, defaults, and what it closes over or reads from its
globals (modules, tensors' shapes, other functions, plain constants). The training flags of
every module reached are read on each call, since `model.eval()` changes the answer.
"""

from __future__ import annotations

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
_MAX_DEPTH = 4
_PRIMITIVES = (int, float, bool, str, bytes, type(None), complex)


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
    bindings: tuple[int, ...] = ()  # ids of what a function's closure and globals held when described

    def current(self, f: Any) -> bool:
        """Whether f still reads the same objects (a rebound global makes this stale)."""
        return _bindings(f) == self.bindings

    def modules(self) -> list[nn.Module]:
        """The live modules f reaches (parameters' devices, buffers to restore after tuning)."""
        return [m for m in (r() for r in self.module_refs) if m is not None]

    def training(self) -> tuple[bool, ...] | None:
        flags = []
        for ref in self.module_refs:
            module = ref()
            if module is None:
                return None  # a module was collected: this description is stale
            flags.append(module.training)
        return tuple(flags)


class _Describer:
    """Walks f and what it reaches, collecting readable parts and modules."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.modules: list[nn.Module] = []
        self._seen: set[int] = set()

    def value(self, obj: Any, depth: int) -> None:
        if isinstance(obj, _PRIMITIVES):
            self.parts.append(repr(obj)[:200])
        elif isinstance(obj, Tensor):
            self.parts.append(f"tensor{tuple(obj.shape)}{obj.dtype}")
        elif isinstance(obj, (tuple, list)) and len(obj) <= 32:
            self.parts.append(f"{type(obj).__name__}[{len(obj)}]")
            for item in obj:
                self.value(item, depth)
        elif isinstance(obj, nn.Module) or callable(obj):
            self.callable(obj, depth)
        else:
            self.parts.append(_qualname(type(obj)))

    def callable(self, f: Any, depth: int) -> None:
        if id(f) in self._seen or depth > _MAX_DEPTH:
            self.parts.append(f"<ref {_qualname(type(f))}>")
            return
        self._seen.add(id(f))
        if isinstance(f, nn.Module):
            self.module(f)
        elif isinstance(f, types.FunctionType):
            self.function(f, depth)
        elif isinstance(f, types.MethodType):
            self.parts.append(f"method {f.__func__.__qualname__}")
            self.value(f.__self__, depth + 1)
            self.function(f.__func__, depth + 1)
        elif isinstance(f, functools.partial):
            self.parts.append("partial")
            self.value(f.func, depth + 1)
            self.value(f.args, depth + 1)
            for name, arg in sorted(f.keywords.items()):
                self.parts.append(name)
                self.value(arg, depth + 1)
        elif isinstance(f, (types.BuiltinFunctionType, types.BuiltinMethodType)) or not hasattr(f, "__dict__"):
            self.parts.append(f"builtin {getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}")
        else:  # a callable object: its class's __call__ and what the instance holds
            self.parts.append(f"object {_qualname(type(f))}")
            call = getattr(type(f), "__call__", None)
            if isinstance(call, types.FunctionType):
                self.function(call, depth + 1)
            for name, attr in sorted(vars(f).items()):
                if isinstance(attr, (nn.Module, Tensor) + _PRIMITIVES) or callable(attr):
                    self.parts.append(name)
                    self.value(attr, depth + 1)

    def module(self, root: nn.Module) -> None:
        for name, sub in root.named_modules(remove_duplicate=False):
            cls = type(sub)
            self.parts.append(f"{name}:{_qualname(cls)}({sub.extra_repr()})")
            if not cls.__module__.startswith("torch."):
                forward = getattr(cls, "forward", None)
                if isinstance(forward, types.FunctionType):
                    self.parts.append(_code_digest(forward.__code__))
            self.modules.append(sub)
        for name, tensor in root.named_parameters():
            self.parts.append(f"p {name}{tuple(tensor.shape)}{tensor.dtype}")
        for name, tensor in root.named_buffers():
            self.parts.append(f"b {name}{tuple(tensor.shape)}{tensor.dtype}")

    def function(self, f: types.FunctionType, depth: int) -> None:
        code = f.__code__
        self.parts.append(f"fn {f.__module__}.{f.__qualname__} {_code_digest(code)}")
        for default in (f.__defaults__ or ()):
            self.value(default, depth + 1)
        for name, cell in zip(code.co_freevars, f.__closure__ or ()):
            self.parts.append(f"free {name}")
            try:
                self.value(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                self.parts.append("<empty>")
        for name in _global_names(code):
            if name in f.__globals__:
                obj = f.__globals__[name]
                if isinstance(obj, (nn.Module, Tensor, types.FunctionType, functools.partial)):
                    self.parts.append(f"global {name}")
                    self.value(obj, depth + 1)


def describe(f: Callable[..., Any], *, fresh: bool = False) -> FnInfo:
    """Name, fingerprint and modules of f; cached per function object (weakly)."""
    cache, cache_key = _cache_slot(f)
    if cache is not None and not fresh:
        info = cache.get(cache_key)
        if info is not None and info.current(f):
            return info
    walker = _Describer()
    walker.callable(f, 0)
    digest = hashlib.sha256("\x1f".join(walker.parts).encode()).hexdigest()[:16]
    info = FnInfo(_readable_name(f), digest, tuple(weakref.ref(m) for m in walker.modules), _bindings(f))
    if cache is not None:
        cache[cache_key] = info
    return info


_FUNCTION_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_METHOD_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bindings(f: Any) -> tuple[int, ...]:
    """Identities of the objects a plain function reads through its closure and globals."""
    if not isinstance(f, types.FunctionType):
        return ()
    cells = tuple(id(_cell_value(cell)) for cell in f.__closure__ or ())
    names = _global_names_cached(f.__code__)
    return cells + tuple(id(f.__globals__.get(name)) for name in names)


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


@functools.lru_cache(maxsize=1024)
def _global_names_cached(code: types.CodeType) -> tuple[str, ...]:
    return tuple(_global_names(code))


def _cache_slot(f: Any) -> tuple[Any, Any]:
    """Where f's description is cached: bound methods are new objects on every access."""
    try:
        if isinstance(f, types.MethodType):
            return _METHOD_CACHE.setdefault(f.__self__, {}), f.__func__
        weakref.ref(f)
        return _FUNCTION_CACHE, f
    except TypeError:  # not weakly referenceable: describe it on every call
        return None, None


def clear_descriptions() -> None:
    """Forget cached descriptions (after editing a function's code in place, say)."""
    _FUNCTION_CACHE.clear()
    _METHOD_CACHE.clear()


def signature(op: str, f: Callable[..., Any], x: Tensor, *, create_graph: bool = False,
              batch_independent: bool | None = None) -> Signature:
    """The signature of applying `op` to f at a batch shaped like x."""
    info = describe(f)
    training = info.training()
    if training is None:  # a module it described was collected since: describe f again
        info = describe(f, fresh=True)
        training = info.training() or ()
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
