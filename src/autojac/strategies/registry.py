"""The one registry of strategies. Adding a strategy is one function and one `register` call.

A strategy computes one or more operations for a `Problem`. It declares what it needs from
`f` (batch independence, vmap support), estimates its peak memory from `Sizes`, and, when it
vectorizes over a basis, how long that basis is, so that the planner can offer it chunked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..norms import ExactNorms
from ..problem import Problem, Sizes

BATCH_INDEPENDENT = "batch_independent"
VMAP = "vmap"
NEEDS = frozenset({BATCH_INDEPENDENT, VMAP})

# Chunk sizes offered for strategies that vectorize over a basis, in preference order
# (None = the whole basis at once). A chunk at least as long as the basis is the whole basis.
CHUNKS: tuple[int | None, ...] = (None, 64, 16)
# For the second-order strategies kept for batch-coupled f: their second level runs through the
# vectorized first level of each span, all of its lanes, so its cost grows with the square of the
# span (tanh MLP 2 -> 64 -> 64 -> 4, B=512, the whole Hessian: spans of 2 take 2.1 s, of 4 6.8 s,
# of 8 23 s, of the whole basis over 20 minutes). Short spans keep them at B times the batch trick.
COUPLED_CHUNKS: tuple[int | None, ...] = (4, 2, 1)


@dataclass(frozen=True)
class Strategy:
    """One way to compute derivatives; see the module docstring."""

    name: str  # stable: stored in plan caches
    ops: frozenset[str]
    run: Callable[[Problem, int | None], Tensor | tuple[Tensor, ...]]  # (problem, chunk) -> result(s)
    memory: Callable[[Sizes, int | None], int]  # (sizes, chunk) -> estimated peak bytes
    needs: frozenset[str] = frozenset()
    basis: Callable[[Sizes], int] | None = None  # length of the basis a chunk splits
    # The cost model: how many passes' worth of vector products over f it makes (reverse mode: one
    # per output coordinate; forward mode: one per input coordinate). Strategies whose work is far
    # above the least are not timed. None: not compared.
    work: Callable[[Sizes], float] | None = None
    chunks: tuple[int | None, ...] = CHUNKS
    # Used only when no strategy needing batch independence applies (it does B times the work).
    coupled_only: bool = False
    differentiable: bool = True  # can return a result with create_graph=True
    # For strategies that serve only some f (a model structure they recognize): "" if the
    # problem suits them, else why not. Checked when listing candidates, never on the hot path.
    applies: Callable[[Problem], str] | None = None
    # True: it runs torch.autograd.grad on a graph it builds from f, so grad mode must be on. False:
    # it computes without a graph of its own (torch.func, plain forward arithmetic), so without
    # create_graph it runs under no_grad and builds none through the parameters.
    autograd: bool = False
    # True: it differentiates a forward-mode derivative (jvp) again, which PyTorch's fused
    # normalizations get wrong even without create_graph (norms.py): they always run as plain
    # operations in it.
    nests_forward: bool = False
    summary: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(f"strategy {self.name!r} needs unknown {sorted(unknown)}; known: {sorted(NEEDS)}")

    def chunk_options(self, sizes: Sizes) -> tuple[int | None, ...]:
        """The chunk sizes worth trying for these sizes, in preference order."""
        if self.basis is None:
            return (None,)
        length = self.basis(sizes)
        shorter = tuple(c for c in self.chunks if c is None or c < length)
        if None not in self.chunks and any(c is not None and c >= length for c in self.chunks):
            return (None, *shorter)  # a chunk as long as the basis: the whole basis in one span
        return shorter

    def __call__(self, problem: Problem, chunk: int | None = None) -> Tensor:
        """Run the strategy in the grad mode it needs, whatever the caller's: the result has x's
        dtype, and is detached unless problem.create_graph (then it stays connected to x and to
        the parameters f uses, also when called under torch.no_grad())."""
        if torch.is_inference_mode_enabled():
            return self._outside_inference(problem, chunk)
        if problem.exact_norms or self.nests_forward:
            with ExactNorms():
                return self._in_grad_mode(problem.replace(exact_norms=False), chunk)
        return self._in_grad_mode(problem, chunk)

    def _in_grad_mode(self, problem: Problem, chunk: int | None) -> Tensor:
        if problem.create_graph or self.autograd:
            if torch.is_grad_enabled():
                result = self.run(problem, chunk)
            else:
                with torch.enable_grad():
                    result = self.run(problem, chunk)
        elif torch.is_grad_enabled():  # torch.func transforms: no graph of their own is needed
            with torch.no_grad():
                result = self.run(problem, chunk)
        else:
            result = self.run(problem, chunk)
        if isinstance(result, tuple):  # several quantities (derivatives)
            return tuple(_finished(r, problem) for r in result)  # type: ignore[return-value]
        return _finished(result, problem)

    def _outside_inference(self, problem: Problem, chunk: int | None) -> Tensor:
        """Derivatives need autograd, which torch.inference_mode() switches off: run with it off, on
        copies of inference tensors (autograd cannot save those); the result is a normal tensor."""
        if problem.create_graph:
            raise ValueError(
                "create_graph=True cannot be honoured under torch.inference_mode(): tensors made there can never "
                "be part of a graph. Call autojac outside inference_mode (torch.no_grad() is fine), or pass "
                "create_graph=False")
        with torch.inference_mode(False):
            problem = problem.replace(x=normal_tensor(problem.x), v=normal_tensor(problem.v),
                                      args=tuple(normal_tensor(a) for a in problem.args))
            return self(problem, chunk)


def _finished(result: Tensor, problem: Problem) -> Tensor:
    if result.dtype != problem.x.dtype:  # forward mode carries f's output dtype
        result = result.to(problem.x.dtype)
    if result.requires_grad and not problem.create_graph:
        result = result.detach()
    return result


def normal_tensor(value: Any) -> Any:
    """An inference tensor copied into a normal one (call with inference mode off); else value."""
    return value.clone() if isinstance(value, Tensor) and value.is_inference() else value


_REGISTRY: dict[str, Strategy] = {}
_HEURISTICS: dict[str, Callable[[Sizes], list[str]]] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy; a name can be registered once."""
    if strategy.name in _REGISTRY:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    _REGISTRY[strategy.name] = strategy
    return strategy


def set_heuristic(op: str, order: Callable[[Sizes], list[str]]) -> None:
    """The heuristic table of `op`: strategy names, most promising first, for given sizes."""
    _HEURISTICS[op] = order


def heuristic(op: str, sizes: Sizes) -> list[str]:
    """Names in `op`'s heuristic order; strategies not named follow in registration order."""
    named = _HEURISTICS[op](sizes) if op in _HEURISTICS else []
    return named + [s.name for s in for_op(op) if s.name not in named]


def check_chunk(strategy: Strategy, chunk: int | None, label: str) -> None:
    """Refuse a chunk for a strategy that does not split a basis."""
    if chunk is not None and strategy.basis is None:
        raise ValueError(
            f"strategy {label!r}: {strategy.name} takes no chunk (it does not vectorize over a basis); "
            f"use strategy={strategy.name!r}")


def get(name: str, op: str | None = None) -> Strategy:
    """The strategy called `name` (serving `op` if given); unknown names list the known ones."""
    strategy = _REGISTRY.get(name)
    if strategy is None or (op is not None and op not in strategy.ops):
        known = ", ".join(names(op))
        what = f" for {op}" if op else ""
        raise ValueError(f"unknown strategy {name!r}{what}; known: {known}")
    return strategy


def names(op: str | None = None) -> list[str]:
    """Registered names, sorted; only those serving `op` if given."""
    return sorted(s.name for s in _REGISTRY.values() if op is None or op in s.ops)


def for_op(op: str) -> list[Strategy]:
    """Strategies serving `op`, in registration order (the heuristic reorders them)."""
    return [s for s in _REGISTRY.values() if op in s.ops]


def all_strategies() -> Iterable[Strategy]:
    return tuple(_REGISTRY.values())


@dataclass
class _Unregister:
    """Context manager for tests: register strategies, remove them on exit."""

    added: list[str] = field(default_factory=list)

    def __enter__(self) -> _Unregister:
        return self

    def add(self, strategy: Strategy) -> Strategy:
        register(strategy)
        self.added.append(strategy.name)
        return strategy

    def __exit__(self, *exc: object) -> None:
        for name in self.added:
            _REGISTRY.pop(name, None)


def temporary() -> _Unregister:
    """`with temporary() as reg: reg.add(Strategy(...))`: strategies that vanish afterwards."""
    return _Unregister()
