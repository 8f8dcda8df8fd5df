"""What a strategy is asked to compute, and the input checks every operation shares."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BatchedFn = Callable[[Tensor], Tensor]


@dataclass(slots=True)
class Problem:
    """One call: `f` maps `x` of shape (B, *in) to (B, *out); `v` (hvp only) has x's shape.

    `f` has the call's extra arguments bound (`base(x, *args)`); strategies that run f on one
    sample at a time under vmap use `base`, `args` and `arg_dims` (each argument's batch
    dimension, None for an argument shared by every sample) through `strategies.basis.per_sample`.
    """

    op: str
    f: BatchedFn
    x: Tensor
    v: Tensor | None = None
    create_graph: bool = False
    base: Callable[..., Tensor] | None = None  # f before its extra arguments were bound (None: f itself)
    args: tuple[Any, ...] = ()
    arg_dims: tuple[int | None, ...] = ()
    want: tuple[str, ...] = ()  # derivatives only: the quantities asked for, in models.DERIVATIVES' order
    second_dims: tuple[int, ...] | None = None  # derivatives only: the input coordinates of the second order
    exact_norms: bool = False  # run f's fused normalizations as plain operations (norms.py)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def n(self) -> int:
        """Number of input elements per sample."""
        return math.prod(self.x.shape[1:])

    def head(self, count: int) -> Problem:
        """The same call on the first `count` samples (extra arguments with a batch dimension cut too)."""
        if count >= self.batch:
            return self
        v = None if self.v is None else self.v[:count]
        if self.base is None or not self.args:
            return self.replace(x=self.x[:count], v=v)
        base = self.base
        args = tuple(a if d is None else a.narrow(d, 0, count) for a, d in zip(self.args, self.arg_dims))
        return self.replace(x=self.x[:count], v=v, args=args, f=lambda x: base(x, *args))

    def replace(self, **changes: Any) -> Problem:
        """A copy with some fields changed (another x, say)."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return Problem(**fields)


@dataclass(frozen=True)
class Sizes:
    """The figures a strategy's memory estimate is made from."""

    batch: int
    n: int  # input elements per sample
    m: int  # output elements per sample
    itemsize: int  # bytes per element of x's dtype
    activations: int  # bytes f saves for backward over the whole batch (measured once)
    create_graph: bool = False  # results must stay differentiable: heuristics order differently

    @classmethod
    def of(cls, x: Tensor, out_shape: tuple[int, ...], activations: int, create_graph: bool = False) -> Sizes:
        """The sizes of a batch x (B, *in) whose per-sample output has `out_shape`."""
        return cls(batch=x.shape[0], n=math.prod(x.shape[1:]), m=math.prod(out_shape), itemsize=x.element_size(),
                   activations=activations, create_graph=create_graph)

    def tensor(self, *dims: int) -> int:
        """Bytes of a tensor with these dimensions in x's dtype."""
        return math.prod(dims) * self.itemsize


def result_shape(op: str, batch: int, out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of `op`'s result (or of one quantity of `derivatives`): (B, *out, *in) for jacobian, hvp
    and hessian_diag; (B, *out, *in, *in) for hessian; (B, *out) for laplacian and value; (B,) for
    divergence."""
    if op == "divergence":
        return (batch,)
    tails = {"jacobian": in_shape, "hvp": in_shape, "hessian_diag": in_shape,
             "hessian": in_shape + in_shape, "laplacian": (), "value": ()}
    return (batch, *out_shape, *tails[op])


def check_f(f: object) -> None:
    if not callable(f):
        raise TypeError(
            f"f must be callable (a function or nn.Module mapping x of shape (B, *in) to (B, *out)); "
            f"got {type(f).__name__}"
        )


def check_x(x: object, name: str = "x") -> None:
    """Refuse what has no per-sample derivative: non-tensors, 0-d, integer or complex dtypes."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, *in); got {type(x).__name__}. "
            f"Convert it with torch.as_tensor({name}, dtype=torch.float32)"
        )
    if x.dim() == 0:
        raise ValueError(
            f"{name} is 0-d (shape ()); autojac needs a batch dimension: shape (B, *in). "
            f"For a single sample use {name}.reshape(1, 1)"
        )
    if x.layout != torch.strided:
        raise TypeError(
            f"{name} has layout {x.layout}; autojac differentiates dense tensors only. Convert it with "
            f"{name}.to_dense()"
        )
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device: it has a shape but no values, and derivatives need values. "
            f"Materialize it on a real device (e.g. torch.empty_like({name}, device='cpu') filled with data)"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} has dtype {x.dtype}; derivatives need a real floating dtype "
            f"(float16, bfloat16, float32 or float64). Convert it with {name}.float()"
        )


def check_v(v: object, x: Tensor) -> None:
    """The direction of a Hessian-vector product must match x exactly."""
    check_x(v, "v")
    assert isinstance(v, Tensor)
    if v.shape != x.shape:
        raise ValueError(
            f"v has shape {tuple(v.shape)} but x has shape {tuple(x.shape)}; "
            f"v is one direction per sample and must have x's shape"
        )
    if v.dtype != x.dtype or v.device != x.device:
        raise ValueError(
            f"v is {v.dtype} on {v.device} but x is {x.dtype} on {x.device}; "
            f"move v with v.to(x)"
        )


def unbatched_hint(x: Tensor) -> str:
    """For an x of shape (n,) that f did not take as n samples of scalars (it failed, or its output's
    first dimension is not n): most likely one sample without its batch dimension."""
    if x.dim() != 1:
        return ""
    return (f". x has shape {tuple(x.shape)}, read as a batch of {x.shape[0]} scalars; if it is one sample, "
            f"x needs a batch dimension: x.unsqueeze(0) for one sample (shape (1, {x.shape[0]}))")


@contextlib.contextmanager
def hint_unbatched(x: Tensor) -> Iterator[None]:
    """Around f's first call: f failing on an x of shape (n,) gets `unbatched_hint` (as a ValueError
    chained to f's error)."""
    try:
        yield
    except (RuntimeError, IndexError, TypeError) as error:
        if x.dim() != 1:
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"f failed on x of shape {tuple(x.shape)}: {type(error).__name__}: {first}"
                         f"{unbatched_hint(x)}") from error


def check_output(y: object, x: Tensor) -> tuple[int, ...]:
    """Check f's output for a batch x and return the per-sample output shape."""
    batch = x.shape[0]
    if not isinstance(y, Tensor):
        raise TypeError(
            f"f must return one tensor of shape (B, *out); it returned {type(y).__name__}. "
            f"Wrap it to return a single tensor, e.g. lambda x: f(x)[0]"
        )
    if y.dim() == 0:
        raise ValueError(
            f"f returned a 0-d tensor for a batch of {batch}; the first dimension must be "
            f"the batch size {batch} (return shape ({batch},) for one scalar per sample){unbatched_hint(x)}"
        )
    if y.shape[0] != batch:
        raise ValueError(
            f"f returned shape {tuple(y.shape)} for a batch of {batch}; "
            f"the first dimension must be the batch size {batch}{unbatched_hint(x)}"
        )
    if not y.dtype.is_floating_point:
        raise TypeError(
            f"f returned dtype {y.dtype}; derivatives need a real floating output"
        )
    if y.device != x.device:
        raise ValueError(
            f"f returned a tensor on {y.device} for x on {x.device}; "
            f"the output must be on x's device"
        )
    return tuple(y.shape[1:])
