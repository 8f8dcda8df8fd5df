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
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_hook_dicts: set[int] = set()  # ids of watched modules' hook dicts: removing a hook from one advances
_installed = False
_guard = threading.Lock()


def epoch() -> int:
    """The current epoch: equal on two calls when no watched module changed in between."""
    return _current[0]


def advance() -> None:
    _current[0] = next(_counter)  # next() is atomic: no change can be lost between threads


def watch(modules: Iterable[nn.Module]) -> None:
    """Advance the epoch when one of these modules changes from now on."""
    install()
    for module in modules:
        _watched.add(module)
        _hook_dicts.update(id(getattr(module, name, None)) for name in _HOOK_DICTS)


def global_hooks() -> int:
    """How many global forward hooks are registered (they run around every module's forward)."""
    module = nn.modules.module
    return len(module._global_forward_hooks) + len(module._global_forward_pre_hooks)


def _matters(module: nn.Module, value: Any) -> bool:
    """Whether assigning `value` to a module can change what it computes: everything but what a
    module's own forward assigns that is data (a plain tensor: an activation stashed for later; a
    number: a count of calls). torch's own modules' numbers are hyperparameters (Dropout's p)."""
    if isinstance(value, bool) or isinstance(value, nn.Parameter):
        return True
    if isinstance(value, (int, float, complex)):
        return type(module).__module__.startswith("torch.") or not _in_forward(module)
    if isinstance(value, torch.Tensor):
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
            set_attribute(self, name, value)
            if self in _watched and _matters(self, value):
                advance()

        def __delattr__(self: nn.Module, name: str) -> None:
            delete_attribute(self, name)
            if self in _watched:
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
            if id(hooks) in _hook_dicts:
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
