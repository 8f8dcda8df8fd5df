"""A process-wide counter that moves whenever a module autojac has planned for may have changed.

A tuned call must tell in a few microseconds whether f is still the f its plan was made for.
Walking a model's tree on every call costs about a microsecond per module, so module trees are
watched instead: `nn.Module.__setattr__` and `__delattr__` are wrapped to advance `epoch()` when
a watched module gets an attribute that can change what it computes (a submodule, a parameter,
a function such as a replaced `forward`, a switch such as `training` or `batch_first`, a
container, a tensor or number assigned from outside the module's forward), and registering or
removing a hook advances it too. Plain tensors and numbers that a module's own forward assigns
do not: a module that stashes its last activation or counts its calls is not described again on
every call. Global hooks are compared by count on every call (`global_hooks`).

What this cannot see (a dict attribute mutated in place, a class attribute rebound) is covered
by the checks of trust.py, as is everything the fingerprint leaves out.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_counter = itertools.count(1)
_current = [0]
_watched: dict[int, weakref.ref[nn.Module]] = {}  # by identity: a module class may define __eq__ and no hash
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# watched modules' hook dicts, by id: removing a hook from one advances (kept weakly: pruned with them)
_hook_dicts: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_installed = False
_guard = threading.Lock()
_MISSING = object()
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def epoch() -> int:
    """The current epoch: equal on two calls when no watched module changed in between."""
    return _current[0]


def advance() -> None:
    _current[0] = next(_counter)  # next() is atomic: no change can be lost between threads


def watch(modules: Iterable[nn.Module]) -> None:
    """Advance the epoch when one of these modules changes from now on."""
    install()
    for module in modules:
        key = id(module)
        if key not in _watched or _watched[key]() is not module:
            _watched[key] = weakref.ref(module, functools.partial(_forget, key))
        for name in _HOOK_DICTS:
            hooks = module.__dict__.get(name)
            if hooks is not None:
                _hook_dicts[id(hooks)] = hooks


def _forget(key: int, ref: weakref.ref[nn.Module]) -> None:
    if _watched.get(key) is ref:  # not a newer module at the same address
        del _watched[key]


def watched(module: nn.Module) -> bool:
    found = _watched.get(id(module))
    return found is not None and found() is module


def global_hooks() -> int:
    """How many global forward hooks are registered (they run around every module's forward)."""
    module = nn.modules.module
    return len(module._global_forward_hooks) + len(module._global_forward_pre_hooks)


def _current_value(module: nn.Module, name: str) -> Any:
    """What `module.name` is now, without running __getattr__'s search more than needed."""
    found = module.__dict__.get(name, _MISSING)
    if found is _MISSING:
        for registry in ("_parameters", "_buffers", "_modules"):
            table = module.__dict__.get(registry)
            if table is not None and name in table:
                return table[name]
    return found


def _same(old: Any, new: Any) -> bool:
    """An assignment that changes nothing: the same object, or an equal switch or number
    (`model.train()` at every step sets every `training` flag to what it was)."""
    if old is new:
        return True
    plain = (bool, int, float, str, type(None))
    return type(old) is type(new) and isinstance(new, plain) and old == new


def _matters(module: nn.Module, name: str, old: Any, value: Any) -> bool:
    """Whether assigning `value` to a module can change what it computes: every change but what
    the module's own forward assigns that is data (a plain tensor, a number, a shape or other
    tuple: an activation stashed for later, a count of calls). torch's own modules' numbers are
    hyperparameters (Dropout's p), whoever assigns them."""
    if _same(old, value):
        return False
    if isinstance(value, (bool, nn.Parameter, nn.Module)) or callable(value):
        return True
    if isinstance(value, (int, float, complex)) and type(module).__module__.startswith("torch."):
        return True
    if isinstance(value, (int, float, complex, torch.Tensor, tuple, type(None))):
        return not _in_forward(module)
    return True


def _in_forward(module: nn.Module) -> bool:
    """Whether the assignment is made by the module's own forward (a few frames up: __setattr__'s
    caller, or a helper forward calls)."""
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    frame: Any = sys._getframe(3)  # _in_forward <- _matters <- __setattr__ <- the assignment
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def install() -> None:
    """Wrap nn.Module's attribute assignment and hook registration, once per process."""
    global _installed
    if _installed:
        return
    with _guard:
        if _installed:
            return
        set_attribute, delete_attribute = nn.Module.__setattr__, nn.Module.__delattr__

        def __setattr__(self: nn.Module, name: str, value: Any) -> None:
            if _is_compiling() or not watched(self):  # dynamo traces assignments: nothing of ours there
                set_attribute(self, name, value)
                return
            old = _current_value(self, name)
            set_attribute(self, name, value)
            if _matters(self, name, old, value):
                advance()

        def __delattr__(self: nn.Module, name: str) -> None:
            delete_attribute(self, name)
            if not _is_compiling() and watched(self):
                advance()

        nn.Module.__setattr__ = __setattr__  # type: ignore[method-assign]
        nn.Module.__delattr__ = __delattr__  # type: ignore[method-assign]
        for name in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                     "register_full_backward_pre_hook", "register_backward_hook"):
            _advance_after(nn.Module, name)
        remove = RemovableHandle.remove

        def remove_hook(self: RemovableHandle) -> None:
            hooks = self.hooks_dict_ref()
            remove(self)
            if hooks is not None and _hook_dicts.get(id(hooks)) is hooks:
                advance()

        RemovableHandle.remove = remove_hook  # type: ignore[method-assign]
        _installed = True


def _advance_after(owner: type, name: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        advance()
        return result

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = original.__name__, original.__qualname__, original.__doc__
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)
