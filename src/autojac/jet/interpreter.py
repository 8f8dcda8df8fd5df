"""The interpreter: runs f under a TorchFunctionMode that meets every torch operation f calls and,
for those that touch a traced tensor, applies the operation's rule from the table (table.py):
the value as f would compute it, and the Taylor coefficients carried beside it.

f is interpreted afresh at every call: nothing about it is cached between calls, so parameters
updated in place or reassigned, numbers read from globals, Python branches and rebound closure
tensors are all seen as they are now. (Within one call, the interpretations of several spans of
directions on the same x share the values that do not depend on the directions: `Memo`.) Traced tensors are known by identity: each value the
interpreter hands back to f is the key of its coefficients (held weakly, so that the coefficients
go when f drops the value). A value changed in place behind the interpreter's back (through a view,
or by an operation without a rule) is caught by its version counter.

Anything the engine cannot follow raises `Unsupported` naming the operation; the strategies turn
that into "does not apply" at planning time, and into a generic fallback at call time.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .maps import Linear, Map
from .order import Order
from .stacks import Unsupported, add
from .table import RULES, resolve


class _Ref(weakref.ref[Tensor]):
    """A weak reference to a traced value that knows its key in the table (for its callback)."""

    __slots__ = ("key",)
    key: int


class Jet:
    """The coefficients carried beside one traced value."""

    __slots__ = ("_t", "s", "version", "node", "stale", "pending")

    def __init__(self, t: Tensor | None, s: Tensor | None, node: int = -1, stale: str = ""):
        self._t = t  # (K, *b) first-order stack; None where not carried
        self.s = s  # (P, *b) second-order stack; None while zero or not carried
        self.version = 0  # the value's version counter when traced
        self.node = node  # its place on the tape (reverse mode), else -1
        self.stale = stale  # why it may no longer be read (updated in place, cut off), else ""
        self.pending: tuple[Tensor, Tensor] | None = None  # (input stack, weight): t of a linear layer, not yet formed

    @property
    def t(self) -> Tensor | None:
        if self.pending is not None:
            stack, weight = self.pending
            self._t, self.pending = F.linear(stack, weight), None
        return self._t

    def tangents(self) -> Tensor:
        """t where it must be carried: forward mode carries every traced value's first-order stack
        (and only forward mode asks the rules for their curvatures)."""
        t = self.t
        assert t is not None, "a traced value without its first-order stack in forward mode"
        return t


Curvature = Callable[[Order], "Tensor | None"]
Link = tuple[Jet, "Map | None"]  # an input's jet and the op's derivative map for it (None: no tape is kept)
# The tape node of a value that depends on x other than through the value where forward and reverse
# mode meet (reverse.meet_jacobian): whatever it feeds is marked too, and f's output must not be.
BYPASS = -2


class Memo:
    """What the interpretations of one call share: f's input alias and the values of `reuse`."""

    def __init__(self) -> None:
        self.x_in: Tensor | None = None
        self.values: dict[int, tuple[Any, tuple[Any, ...], Any]] = {}


class Interpreter(TorchFunctionMode):
    """One interpretation of f; see the module docstring.

    order: the coefficients to carry forward (None: none, as when only recording for reverse mode).
    record: keep a tape of every traced operation's maps, for reverse mode.
    curvature_on_tape: carry only first-order stacks forward, and keep each operation's own
    second-order term (a function of its inputs' tangents) on the tape, to be weighted by the
    output's adjoint in a reverse sweep (reverse.second_order_by_adjoints) instead of propagated.
    """

    def __init__(self, order: Order | None, record: bool = False, curvature_on_tape: bool = False):
        super().__init__()
        self.order = order
        self.forward = order is not None
        self.second = order is not None and order.second and not curvature_on_tape
        self.table: dict[int, tuple[_Ref, Jet]] = {}
        self.tape: list[tuple[int, list[tuple[int, Map]]]] | None = [] if record or curvature_on_tape else None
        self.curvatures: dict[int, Curvature] | None = {} if curvature_on_tape else None
        self.shapes: dict[int, torch.Size] = {}  # the value's shape at each node with a curvature
        # Values computed by an earlier interpretation of f on the same x within one call (an
        # earlier span of directions), by position: see `reuse`. None: nothing shared.
        self.memo: Memo | None = None
        self.step = 0
        self.failure = ""  # the first Unsupported raised, even if f caught it
        self.watch: Callable[[Interpreter, Tensor, Jet], None] | None = None  # sees every traced value
        self.seen: set[str] | None = None  # the names of the rules applied, when a test asks
        self.widest = 0  # elements of the largest traced value (for choosing spans of directions)

    # -- the table of traced values -------------------------------------------------------------

    def jet(self, value: object) -> Jet | None:
        """The coefficients of a traced value, None for a constant."""
        entry = self.table.get(id(value))
        if entry is None:
            return None
        ref, jet = entry
        traced = ref()
        if traced is None or traced is not value:
            return None
        if jet.stale:
            self.fail(jet.stale)
        if jet.version != traced._version:
            self.fail("f changes a traced tensor in place after using it (through a view, or an operation "
                      "without a rule)")
        return jet

    def track(self, value: Tensor, jet: Jet, new: bool = True) -> Tensor:
        """Trace value with jet; `new` is False for a value f already had, updated in place (the
        watch sees values as they are made, one per operation)."""
        key = id(value)
        size = value.numel()
        if size > self.widest:
            self.widest = size
        jet.version = value._version
        ref = _Ref(value, self._forget)
        ref.key = key
        self.table[key] = (ref, jet)
        if new and self.watch is not None:
            self.watch(self, value, jet)
        return value

    def _forget(self, ref: _Ref) -> None:
        entry = self.table.get(ref.key)
        if entry is not None and entry[0] is ref:
            del self.table[ref.key]

    def spoil(self, value: Tensor, why: str) -> None:
        """Mark a value as no longer readable (updated in place: its coefficients are gone)."""
        self.track(value, Jet(None, None, stale=why))

    def in_place(self, target: Tensor, value: Any, name: str) -> Any:
        """Finish an in-place operation computed out of place as `value`. In forward mode without
        autograd: write it into `target` and trace target with value's coefficients (f sees its
        tensor updated, as asked). Otherwise writing would change tensors held for later: by the
        coefficients' graph (autograd), or by the tape's maps and second-order terms (reverse mode:
        an operation's own value, its inputs). The update is then returned as a new tensor, and
        target, and every traced tensor sharing its memory, may no longer be read."""
        if torch.is_grad_enabled() or self.tape is not None or not isinstance(value, Tensor) \
                or value.shape != target.shape:
            self._spoil_aliases(target, f"f reads a tensor after {name} updated it in place")
            return value
        jet = self.jet(value)
        target.copy_(value)
        if self.memo is not None:  # a value shared with the other spans may be the one written
            self.memo.values.clear()
        if jet is None:
            self.table.pop(id(target), None)
        else:
            twin = Jet(jet._t, jet.s, jet.node)
            twin.pending = jet.pending
            self.track(target, twin, new=False)
        return target

    def _spoil_aliases(self, target: Tensor, why: str) -> None:
        """Spoil target and the traced tensors that share its memory (its views, its base)."""
        memory = _memory(target)
        if memory:
            for ref, _ in list(self.table.values()):
                other = ref()
                if other is not None and other is not target and _memory(other) == memory:
                    self.spoil(other, why)
        self.spoil(target, why)

    def fail(self, why: str) -> None:
        if not self.failure:
            self.failure = why
        raise Unsupported(why)

    # -- what rules call ------------------------------------------------------------------------

    def emit(self, value: Tensor, links: Sequence[Link], curvature: Curvature | None = None,
             joint: Callable[[list[Tensor | None]], Tensor] | None = None,
             stacks: tuple[Tensor | None, Tensor | None] | None = None) -> Tensor:
        """Trace value = op(inputs): links holds (input's jet, the op's derivative map for that
        input); curvature(order) the op's own second-order term (None if it is linear); joint, if
        given, computes the output's stack from all inputs' stacks at once (None: zero) instead of
        summing the maps' (concatenation); stacks, if given, are the output's (t, s), computed by
        the rule itself (the maps are then only for the tape)."""
        if not links:
            return value
        if self.tape is not None and any(jet.node == BYPASS for jet, _ in links):
            return self.track(value, Jet(None, None, BYPASS))
        if self.forward and joint is None and stacks is None and len(links) == 1 \
                and isinstance(layer := links[0][1], Linear) and self.tape is None:
            # a linear layer's tangents wait until read: the last layer's, for a Laplacian, never are
            jet_in = links[0][0]
            jet = Jet(None, layer(jet_in.s) if jet_in.s is not None else None)
            jet.pending = (jet_in.tangents(), layer.weight)
            return self.track(value, jet)
        t = s = None
        if stacks is not None:
            t, s = stacks
        elif self.forward:
            if joint is not None:
                t = joint([jet.t for jet, _ in links])
                if any(jet.s is not None for jet, _ in links):
                    s = joint([jet.s for jet, _ in links])
            else:
                for jet, m in links:
                    assert m is not None  # without joint or stacks, a rule gives every input's map
                    if jet.t is not None:
                        t = add(t, m(jet.t))
                    if jet.s is not None:
                        s = add(s, m(jet.s))
            if self.second and curvature is not None:
                assert self.order is not None  # (second order is carried only with an order)
                s = add(s, curvature(self.order))
        node = -1
        if self.tape is not None:
            node = len(self.tape)
            inputs: list[tuple[int, Map]] = []
            for jet, m in links:
                if jet.node >= 0:
                    assert m is not None  # with a tape kept, a rule gives every input's map
                    inputs.append((jet.node, m))
            self.tape.append((node, inputs))
            if self.curvatures is not None and curvature is not None:
                self.curvatures[node] = curvature
                self.shapes[node] = value.shape
        return self.track(value, Jet(t, s, node))

    def emit_each(self, values: Sequence[Any], jet: Jet, split: Callable[[Tensor], Sequence[Tensor | None]],
                  maps: Sequence[Map | None]) -> None:
        """Trace an op with several outputs, linear in one input: split(stack) gives each output's
        stack (computed once per stack); maps[i] is output i's map for the tape (None: not traced)."""
        if self.tape is not None and jet.node == BYPASS:
            for value, m in zip(values, maps):
                if m is not None:
                    self.track(value, Jet(None, None, BYPASS))
            return
        t_parts = split(jet.t) if self.forward and jet.t is not None else None
        s_parts = split(jet.s) if self.forward and jet.s is not None else None
        for i, (value, m) in enumerate(zip(values, maps)):
            if m is None:
                continue
            node = -1
            if self.tape is not None:
                node = len(self.tape)
                self.tape.append((node, [(jet.node, m)] if jet.node >= 0 else []))
            self.track(value, Jet(t_parts[i] if t_parts is not None else None,
                                  s_parts[i] if s_parts is not None else None, node))

    def reuse(self, tag: Any, inputs: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """compute(), or what it gave at the same step of an earlier span's interpretation when that
        step was the same operation (`tag`) of the very same input objects. Spans of directions
        interpret f on the same x one after the other; the values they share (tanh of a layer,
        the layer's product) are then computed once per call, not once per span."""
        memo = self.memo
        if memo is None:
            return compute()
        self.step += 1
        found = memo.values.get(self.step)
        if found is not None and found[0] == tag and len(found[1]) == len(inputs) \
                and all(a is b for a, b in zip(found[1], inputs)):
            return found[2]
        out = compute()
        memo.values[self.step] = (tag, inputs, out)
        return out

    def decompose(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a composite (a decomposition into operations with rules) under this interpreter."""
        with self:
            return fn(*args, **kwargs)

    def seed(self, x: Tensor, t: Tensor | None, s: Tensor | None = None) -> Tensor:
        """Trace f's input with its first-order stack (the directions) and second-order stack."""
        node = -1
        if self.tape is not None:
            node = len(self.tape)
            self.tape.append((node, []))
        return self.track(x, Jet(t, s, node))

    # -- the mode -------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _AUTOGRAD or _peek_transform() is not None:
            self._refuse_autograd(func)
        if not self._touches(args, kwargs):
            return func(*args, **kwargs)
        rule = RULES.get(func)
        in_place = False
        if rule is None:
            func, rule, in_place = resolve(func, args, kwargs)
            if rule is None:
                return self._without_rule(func, args, kwargs)
        if kwargs.get("out") is not None:
            self.fail(f"{name_of(func)} with out=")
        if self.seen is not None:
            self.seen.add(rule.name)
        try:
            value = rule.apply(self, func, args, kwargs)
        except Unsupported as error:
            self.fail(str(error))
        except Exception as error:  # a rule that cannot follow this call: the engine does not apply
            self.fail(f"{name_of(func)} failed in the engine ({type(error).__name__}: {error})")
        if in_place:
            return self.in_place(args[0], value, name_of(func))
        return value

    def _refuse_autograd(self, func: Callable[..., Any]) -> None:
        """f differentiates inside (autograd.grad, a torch.func transform): what it computes depends on
        x through autograd's graph, which the engine does not see (it would take it for a constant)."""
        if func in _AUTOGRAD:
            self.fail(f"f calls {name_of(func)} (derivatives inside f are not followed by the engine)")
        self.fail(f"f runs a torch.func transform (vmap, grad, jacrev...) around {name_of(func)}: its inside is not "
                  f"followed by the engine")

    def _touches(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        table = self.table
        for a in args:
            if isinstance(a, Tensor):
                if id(a) in table:
                    return True
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, Tensor) and id(b) in table:
                        return True
        for a in kwargs.values():
            if isinstance(a, Tensor) and id(a) in table:
                return True
        return False

    def _without_rule(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """An operation with no rule is fine if what it returns carries no derivative (shapes,
        booleans, indices, Python numbers): the engine runs it and goes on."""
        value = func(*args, **kwargs)
        if _carries_derivative(value):
            self.fail(f"no rule for {name_of(func)}")
        return value


_AUTOGRAD = frozenset({torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward})
_peek_transform = torch._C._functorch.peek_interpreter_stack


def _memory(value: Tensor) -> int:
    """Where value's storage starts (0 for a tensor without one)."""
    try:
        return int(value.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


def _carries_derivative(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point() or value.is_complex()
    if isinstance(value, (list, tuple)):
        return any(_carries_derivative(v) for v in value)
    return False


def name_of(func: Any) -> str:
    """A readable name for a torch function: torch.sin, torch.Tensor.cumprod, torch.Tensor.T..."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:  # a property
        return f"torch.Tensor.{getattr(owner, '__name__', '?')}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if "<locals>" in name:  # made by a factory (F.max_pool2d is boolean_dispatch.<locals>.fn): its own name
        name = getattr(func, "__name__", name)
    module = getattr(func, "__module__", None)
    if name.startswith(("TensorBase.", "Tensor.")):
        return "torch.Tensor." + name.split(".", 1)[1]
    if module in ("torch._C._nn", "torch.nn.functional"):
        return "torch.nn.functional." + name
    if module and module.startswith("torch._C._"):  # torch._C._linalg.linalg_inv is torch.linalg.inv
        space = module[len("torch._C._"):]
        public = {"nn": "torch.nn.functional"}.get(space, f"torch.{space}")
        return f"{public}.{name.removeprefix(space + '_')}"
    if module in (None, "torch", "torch._C._VariableFunctions") or "_VariableFunctions" in name:
        return "torch." + name.split(".")[-1]
    return f"{module}.{name}"


def run(f: Callable[[Tensor], Any], x: Tensor, interpreter: Interpreter, t: Tensor | None,
        s: Tensor | None = None) -> tuple[Tensor, Jet | None]:
    """Interpret f on x seeded with stacks t (and s): f's output and its jet (None if constant)."""
    memo = interpreter.memo
    x_in = memo.x_in if memo is not None and memo.x_in is not None else x.view_as(x)  # an alias: the caller's x is not traced
    if memo is not None:
        memo.x_in = x_in
    interpreter.seed(x_in, t, s)
    try:
        with interpreter:
            y = f(x_in)
        if interpreter.failure:  # raised inside f and caught there: f took another path
            raise Unsupported(interpreter.failure)
        if not isinstance(y, Tensor):
            raise Unsupported(f"f returned {type(y).__name__}, not a tensor")
        return y, interpreter.jet(y)
    finally:
        interpreter.table.clear()


__all__ = ["Interpreter", "Jet", "Memo", "Unsupported", "name_of", "run"]
