"""Rules of the operations that move data (reshapes, transposes, indexing and index writes,
concatenation and splitting, casts) and of reductions (sum, mean, max): linear in the traced input,
the same operation on every coefficient stack, its dimension arguments counted from the end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .algebra import _jet, _selection, _shape, _traced
from .interpreter import Interpreter, Link
from .maps import Apply, Cast, Identity
from .stacks import Unsupported, compact, expanded, lift, zeros
from .table import Example, def_rule, deflinear, getters, named

T = torch.Tensor

# ---------------------------------------------------------------------------------------------
# Moving data: linear in the traced input, the same operation on every coefficient

def _negative(dim: int, ndim: int) -> int:
    """A dimension of a value counted from the end, so that it means the same on a stack."""
    return dim - ndim if dim >= 0 else dim


def _dims(dim: Any, ndim: int) -> list[int]:
    if dim is None:
        return list(range(-ndim, 0))
    if isinstance(dim, (list, tuple)):
        return [_negative(d, ndim) for d in dim] if len(dim) else list(range(-ndim, 0))
    return [_negative(dim, ndim)]


def _reshaped(x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    if args and isinstance(args[0], torch.dtype):
        raise Unsupported("view as another dtype")
    shape = y.shape
    return lambda c: c.reshape(c.shape[0], *shape)


deflinear("reshape", named("reshape", "view", "view_as", "reshape_as", "flatten", "unflatten", "squeeze",
                           "unsqueeze", "ravel"), _reshaped,
          examples=[Example(lambda x: x.view(-1, 2, 3).flatten(1) * x, (6,)), lambda x: x.reshape(x.shape[0], 1, -1).squeeze(1),
                    lambda x: x.unsqueeze(-1).unsqueeze(1).ravel().view_as(x)])


def _expanded(x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    shape = y.shape
    return lambda c: expanded(c, shape)


deflinear("expand", named("expand", "expand_as", "broadcast_to"), _expanded,
          examples=lambda x: x[:, None, :].expand(-1, 2, -1) * torch.linspace(0, 1, 2, dtype=x.dtype)[:, None])


def _repeated(x: Tensor, y: Tensor, *sizes: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)) else sizes
    sizes = tuple(kwargs.get("dims", kwargs.get("repeats", sizes)))
    full = (1,) * (x.dim() - len(sizes)) + tuple(sizes)  # tile pads with ones; both may add dimensions
    return lambda c: lift(c, len(full)).repeat(1, *full)


deflinear("repeat", [T.repeat, torch.tile, T.tile], _repeated,
          examples=[lambda x: x.repeat(1, 2) * torch.linspace(0, 1, 6, dtype=x.dtype), lambda x: torch.tile(x, (2,))])


def _permutation(perm: Sequence[int]) -> Callable[[Tensor], Tensor]:
    return lambda c: c.permute(0, *(p + 1 for p in perm))


def _permute_rule(perm_of: Callable[..., list[int]]) -> Callable[..., Callable[[Tensor], Tensor]]:
    def stack_fn(x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
        return _permutation(perm_of(x.dim(), *args, **kwargs))
    return stack_fn


def _perm_permute(ndim: int, *dims: Any) -> list[int]:
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    return [d % ndim for d in dims]


def _perm_transpose(ndim: int, dim0: int, dim1: int) -> list[int]:
    perm = list(range(ndim))
    perm[dim0 % ndim], perm[dim1 % ndim] = perm[dim1 % ndim], perm[dim0 % ndim]
    return perm


def _perm_movedim(ndim: int, source: Any, destination: Any) -> list[int]:
    source = [s % ndim for s in (source if isinstance(source, (list, tuple)) else [source])]
    destination = [d % ndim for d in (destination if isinstance(destination, (list, tuple)) else [destination])]
    order = [d for d in range(ndim) if d not in source]
    for dst, src in sorted(zip(destination, source)):
        order.insert(dst, src)
    return order


def _perm_t(ndim: int) -> list[int]:
    return list(range(ndim))[::-1]


def _perm_mt(ndim: int) -> list[int]:
    return _perm_transpose(ndim, -2, -1)


deflinear("permute", named("permute"), _permute_rule(_perm_permute), batched=True,
          examples=Example(lambda x: x.view(-1, 2, 3).permute(0, 2, 1).reshape(-1, 6) * x, (6,)))
deflinear("transpose", named("transpose", "swapaxes", "swapdims"), _permute_rule(_perm_transpose), batched=True,
          examples=Example(lambda x: x.view(-1, 2, 3).transpose(1, 2).reshape(-1, 6) * x, (6,)))
deflinear("movedim", named("movedim", "moveaxis"), _permute_rule(_perm_movedim), batched=True,
          examples=Example(lambda x: x.view(-1, 2, 3).movedim(1, -1).reshape(-1, 6) * x, (6,)))
deflinear("t", [torch.t, T.t, *getters("T")], _permute_rule(_perm_t), batched=True,
          examples=lambda x: torch.sin(x.T).t() * x)
deflinear("mT", getters("mT", "mH", "H"), _permute_rule(_perm_mt), batched=True,
          examples=Example(lambda x: x.view(-1, 2, 3).mT.reshape(-1, 6) * x, (6,)))


def _stack_index(index: Any) -> tuple[Any, ...]:
    """x[index] on a value is stack[(slice(None), *index)] on its stacks, unless advanced indices
    are split by a slice (their dimensions would then move to the front, before the stack's)."""
    index = index if isinstance(index, tuple) else (index,)
    advanced = [i for i, item in enumerate(index) if isinstance(item, (Tensor, list))]
    if advanced:
        advanced += [i for i, item in enumerate(index) if isinstance(item, int) and not isinstance(item, bool)]
        advanced.sort()
        if advanced[-1] - advanced[0] + 1 != len(advanced):
            raise Unsupported("indexing with index tensors split by a slice")
    return (slice(None), *index)


def _indexed(x: Tensor, y: Tensor, index: Any) -> Callable[[Tensor], Tensor]:
    full = _stack_index(index)
    return lambda c: c[full]


deflinear("getitem", [T.__getitem__], _indexed,
          examples=[lambda x: x[:, :1] * x[:, 1:2] + x[:, -1:], lambda x: x[..., [2, 0]] * x[:, None, 1],
                    lambda x: x[:, torch.tensor([True, False, True])] ** 2])


def _narrow(x: Tensor, y: Tensor, dim: int, start: Any, length: int) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.narrow(d, start, length)


deflinear("narrow", named("narrow"), _narrow, examples=lambda x: x.narrow(1, 1, 2) * x[:, :2])


def _select(x: Tensor, y: Tensor, dim: int, index: int) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.select(d, index)


deflinear("select", named("select"), _select, examples=lambda x: x.select(1, 2)[:, None] * x)


def _index_select(x: Tensor, y: Tensor, dim: int, index: Tensor) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.index_select(d, index)


deflinear("index_select", named("index_select"), _index_select,
          examples=lambda x: x.index_select(1, torch.tensor([2, 0, 0])) * x)


def _gather(x: Tensor, y: Tensor, dim: int, index: Tensor, **kwargs: Any) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.gather(d, index.expand(c.shape[0], *index.shape))


deflinear("gather", named("gather"), _gather,
          examples=lambda x: x.gather(1, torch.tensor([[2, 0]]).expand(x.shape[0], 2)) * x[:, :2])


def _take_along_dim(x: Tensor, y: Tensor, indices: Tensor, dim: int | None = None) -> Callable[[Tensor], Tensor]:
    if dim is None:
        flat = indices.reshape(-1)
        return lambda c: c.flatten(1).index_select(1, flat)
    d = _negative(dim, x.dim())
    return lambda c: torch.take_along_dim(c, indices.expand(c.shape[0], *indices.shape), d)


deflinear("take_along_dim", named("take_along_dim"), _take_along_dim,
          examples=lambda x: torch.take_along_dim(x, x.detach().argsort(1), 1) * x)


def _roll(x: Tensor, y: Tensor, shifts: Any, dims: Any = None) -> Callable[[Tensor], Tensor]:
    if dims is None:
        return lambda c: c.flatten(1).roll(shifts, 1).view(c.shape)
    return lambda c: c.roll(shifts, _dims(dims, x.dim()))


deflinear("roll", named("roll"), _roll, examples=lambda x: x.roll(1, 1) * x)


def _flip(x: Tensor, y: Tensor, *dims: Any) -> Callable[[Tensor], Tensor]:
    given = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    d = _dims(list(given), x.dim())
    return lambda c: c.flip(d)


deflinear("flip", named("flip"), _flip, examples=lambda x: x.flip(-1) * x)


def _diagonal(x: Tensor, y: Tensor, offset: int = 0, dim1: int = 0, dim2: int = 1) -> Callable[[Tensor], Tensor]:
    d1, d2 = _negative(dim1, x.dim()), _negative(dim2, x.dim())
    return lambda c: c.diagonal(offset, d1, d2)


deflinear("diagonal", named("diagonal"), _diagonal,
          examples=Example(lambda x: torch.diagonal(x.view(-1, 2, 2), 0, 1, 2) * x[:, :2], (4,)))


def _diag_embed(x: Tensor, y: Tensor, offset: int = 0, dim1: int = -2, dim2: int = -1) -> Callable[[Tensor], Tensor]:
    d1, d2 = _negative(dim1, x.dim() + 1), _negative(dim2, x.dim() + 1)
    return lambda c: torch.diag_embed(c, offset, d1, d2)


deflinear("diag_embed", named("diag_embed"), _diag_embed,
          examples=lambda x: torch.diag_embed(x).flatten(1) * torch.sin(x).repeat(1, 3))


def _triangle(x: Tensor, y: Tensor, diagonal: int = 0, *, name: str) -> Callable[[Tensor], Tensor]:
    op = getattr(torch, name)
    return lambda c: op(c, diagonal)


deflinear("tril", named("tril"), lambda x, y, *a, **k: _triangle(x, y, *a, **k, name="tril"),
          examples=Example(lambda x: x.view(-1, 2, 2).tril().flatten(1) * x, (4,)))
deflinear("triu", named("triu"), lambda x, y, *a, **k: _triangle(x, y, *a, **k, name="triu"),
          examples=Example(lambda x: x.view(-1, 2, 2).triu(1).flatten(1) * x, (4,)))


def _cumsum(x: Tensor, y: Tensor, dim: int, *, dtype: Any = None) -> Callable[[Tensor], Tensor]:
    d = _negative(dim, x.dim())
    return lambda c: c.cumsum(d, dtype=dtype)


deflinear("cumsum", named("cumsum"), _cumsum, examples=lambda x: x.cumsum(1) * x)


def _pad(x: Tensor, y: Tensor, pad: Sequence[int], mode: str = "constant", value: Any = None) -> Callable[[Tensor], Tensor]:
    if mode == "constant":
        return lambda c: F.pad(c, pad)  # the fill value is a constant
    if x.dim() < 2:
        raise Unsupported(f"pad in mode {mode!r} of a 1-d tensor")
    return lambda c: F.pad(c.flatten(0, 1), pad, mode).unflatten(0, c.shape[:2])


deflinear("pad", [F.pad, torch._C._nn.pad], _pad,
          examples=[lambda x: F.pad(x, (1, 2), value=3.0) * torch.linspace(0, 1, 6, dtype=x.dtype),
                    Example(lambda x: F.pad(x.view(-1, 1, 3), (1, 1), mode="reflect").flatten(1) ** 2, (3,))])


def _cast(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0] if args else kwargs["input"]
    y = func(*args, **kwargs)
    jet = ctx.jet(x)
    if jet is None or not isinstance(y, Tensor) or not (y.is_floating_point() or y.is_complex()):
        return y  # x.type() names a type; a cast to integers carries no derivative
    return ctx.emit(y, [(jet, Cast(x, y))])


def_rule("cast", named("to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "clone",
                       "contiguous"), _cast, "linear",
         [lambda x: x.to(x.dtype).clone().contiguous() * x.double().to(x) * x.to("cpu").type(x.type()),
          Example(lambda x: x.float().sin().double() * x + x.long() * x, tolerance=1e-5)])  # in part float32


def _reduce(mean: bool) -> Callable[..., Callable[[Tensor], Tensor]]:
    """sum or mean over dimensions: on a compact stack, a dimension it does not vary along is
    scaled by its size (sum) or left (mean) instead of read B times."""
    def stack_fn(x: Tensor, y: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Callable[[Tensor], Tensor]:
        if isinstance(dim, torch.dtype):  # sum(x, dtype) positionally
            dim, dtype = None, dim
        dims = _dims(dim, x.dim())
        shape = x.shape

        def fn(c: Tensor) -> Tensor:
            c = lift(c, len(shape))
            scale, along = 1, []
            for d in dims:
                if c.shape[d] == 1 and shape[d] != 1:
                    scale *= 1 if mean else shape[d]
                else:
                    along.append(d)
            out = (c.mean(along, keepdim=True) if mean else c.sum(along, keepdim=True)) if along else c
            if not keepdim:
                out = out.squeeze(tuple(dims)) if dims else out
            if dtype is not None:
                out = out.to(dtype)
            return out * scale if scale != 1 else out
        return fn
    return stack_fn


deflinear("sum", named("sum"), _reduce(False), batched=True,
          examples=[lambda x: x.sum(-1, keepdim=True) * x, lambda x: torch.sum(x * x, 1),
                    lambda x: x.view(-1, 1, 3).sum((1, 2), keepdim=True)[:, 0] * x])
deflinear("mean", named("mean"), _reduce(True), batched=True,
          examples=[lambda x: x.mean(-1, keepdim=True) * x, lambda x: torch.mean(x * x, dim=(1,))])


def _extremum(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """max/min/amax/amin, differentiated as torch does: max(x, dim) follows the entry whose index
    it returns; the others (amax, amin, and max over everything) split evenly among tied entries."""
    x = args[0]
    rest = list(args[1:])
    if rest and isinstance(rest[0], Tensor) or "other" in kwargs:  # torch.max(a, b) is maximum
        return _selection(ctx, func, args, kwargs)
    dim = kwargs.get("dim", rest[0] if rest else None)
    keepdim = kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
    jet = _traced(ctx, x)
    out = func(*args, **kwargs)
    if isinstance(out, tuple):  # (values, indices)
        y, indices = out
        assert dim is not None  # a tuple comes back for one dimension
        d = _negative(dim, x.dim())
        where = indices if keepdim else indices.unsqueeze(d)

        def pick(c: Tensor) -> Tensor:
            picked = expanded(c, x.shape).gather(d, where.expand(c.shape[0], *where.shape))
            return picked if keepdim else picked.squeeze(d)
        ctx.emit_each(out, jet, lambda c: (pick(c), None), [Apply(pick, x.shape, y.shape, batched=True), None])
        return out
    dims = _dims(dim, x.dim())
    kept = out if keepdim else out.reshape([1 if d - x.dim() in dims else size for d, size in enumerate(x.shape)])
    ties = (x == kept).to(out.dtype)
    weight = ties / ties.sum(dims, keepdim=True)  # (*x.shape)

    def share(c: Tensor) -> Tensor:
        return (lift(c, x.dim()) * weight).sum(dims, keepdim=keepdim)
    return ctx.emit(out, [(jet, Apply(share, x.shape, out.shape, batched=True))])


def_rule("extremum", named("max", "min", "amax", "amin"), _extremum, "linear",
         [lambda x: x.amax(-1, keepdim=True) * x, lambda x: torch.max(x, 1).values[:, None] * x,
          lambda x: x.min(dim=1)[0] * x[:, 0], lambda x: torch.max(x, x.flip(-1)) * x,
          lambda x: torch.cat([x, x[:, :1]], 1).amax(-1, keepdim=True) * x,  # a tie, split evenly
          Example(lambda x: x.view(-1, 2, 2).repeat(1, 1, 2).amin((1, 2)) * x[:, 0], (4,))])


def _cat(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
         stack: bool = False) -> Any:
    tensors = list(args[0] if args else kwargs["tensors"])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    y = func(*args, **kwargs)
    d = _negative(dim, y.dim())
    jets = [_jet(ctx, t) for t in tensors]
    op = torch.stack if stack else torch.cat

    def joint(pieces: Sequence[Tensor | None]) -> Tensor:
        count = next(p.shape[0] for p in pieces if p is not None)
        lifted = [lift(p, t.dim()) if p is not None else zeros(count, t) for p, t in zip(pieces, tensors)]
        # a dimension (not the joined one) along which every piece is compact stays compact
        keep = [all(p.shape[i + 1] == 1 for p in lifted) for i in range(tensors[0].dim())]
        if not stack:
            keep[d] = False
        shapes = [[1 if keep[i] else size for i, size in enumerate(t.shape)] for t in tensors]
        return op([p.expand(count, *shape) for p, shape in zip(lifted, shapes)], d)

    traced = [(i, jet) for i, jet in enumerate(jets) if jet is not None]

    def joint_of_links(stacks: Sequence[Tensor | None]) -> Tensor:
        pieces: list[Tensor | None] = [None] * len(tensors)
        for (i, _), stack in zip(traced, stacks):
            pieces[i] = stack
        return joint(pieces)

    def alone(i: int) -> Callable[[Tensor], Tensor]:  # the joint stack when only input i has one
        return lambda c: joint([c if j == i else None for j in range(len(tensors))])

    links = [(jet, Apply(alone(i), tensors[i].shape, y.shape, batched=True)) for i, jet in traced]
    return ctx.emit(y, links, joint=joint_of_links)


def_rule("cat", named("cat", "concat", "concatenate"), _cat, "linear",
         [lambda x: torch.cat([x, x[:, :1] * 2, torch.ones_like(x[:, :1])], 1) * x.repeat(1, 2)[:, :5],
          lambda x: torch.cat((x[:, :1], x[:, 1:]), dim=-1) ** 2])
def_rule("stack", named("stack"), lambda ctx, func, args, kwargs: _cat(ctx, func, args, kwargs, stack=True), "linear",
         lambda x: torch.stack([x, torch.sin(x), torch.zeros_like(x)], 1).flatten(1) * x.repeat(1, 3))


def _pieces(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """split, chunk, unbind: several outputs, each a piece of the input."""
    x = args[0] if args else kwargs["input"]
    out = func(*args, **kwargs)
    jet = _traced(ctx, x)
    name = func.__name__
    rest = list(args[1:])
    if name == "unbind":
        dim = kwargs.get("dim", rest[0] if rest else 0)
        d = _negative(dim, x.dim())

        def split(c: Tensor) -> Sequence[Tensor]:
            return expanded(c, x.shape).unbind(d)
    else:
        size: Any = kwargs.get("split_size_or_sections",
                               kwargs.get("split_size", kwargs.get("chunks", rest[0] if rest else None)))
        dim = kwargs.get("dim", rest[1] if len(rest) > 1 else 0)
        d = _negative(dim, x.dim())
        chunk = name == "chunk"

        def split(c: Tensor) -> Sequence[Tensor]:
            return torch.chunk(expanded(c, x.shape), size, d) if chunk else torch.split(expanded(c, x.shape), size, d)

    def parts(c: Tensor) -> list[Tensor]:
        return [compact(p) for p in split(c)]

    def piece(i: int) -> Callable[[Tensor], Tensor]:
        return lambda c: split(c)[i]

    maps = [Apply(piece(i), x.shape, value.shape, batched=True) for i, value in enumerate(out)]
    ctx.emit_each(out, jet, parts, maps)
    return out


def_rule("split", named("split", "chunk", "unbind"), _pieces, "linear",
         [lambda x: x.split(1, 1)[0] * x.split([1, 2], dim=1)[1], lambda x: torch.chunk(x, 3, 1)[2] * x,
          lambda x: x.unbind(1)[1][:, None] * x])


def _setitem(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    target, index, source = args
    jt, js = ctx.jet(target), _jet(ctx, source)
    region = target[index].shape
    full = _stack_index(index)
    func(target, index, source)  # the write itself, as f asked for it

    def written(old: Tensor | None, new: Tensor | None) -> Tensor:
        given = old if old is not None else new
        assert given is not None  # a link's stack, or the joint's (one of the inputs has a stack)
        count = given.shape[0]
        out = expanded(old, target.shape).clone() if old is not None else target.new_zeros(count, *target.shape)
        out[full] = expanded(new, region) if new is not None else 0
        return out

    links: list[Link] = []
    if jt is not None:
        links.append((jt, Apply(lambda c: written(c, None), target.shape, target.shape, batched=True)))
    if js is not None:
        links.append((js, Apply(lambda c: written(None, c), _shape(source), target.shape, batched=True)))
    ctx.emit(target, links, joint=lambda stacks: written(*(
        [stacks[0], stacks[1]] if len(links) == 2 else ([stacks[0], None] if jt is not None else [None, stacks[0]]))))
    return None


def_rule("setitem", [T.__setitem__], _setitem, "linear",
         [lambda x: _written(x), lambda x: _written_into_traced(x)])


def _written(x: Tensor) -> Tensor:
    out = torch.zeros(x.shape[0], 4, dtype=x.dtype)
    out[:, 1:] = torch.sin(x)
    out[:, 0] = x[:, 0] * x[:, 1]
    return out * x[:, :1]


def _written_into_traced(x: Tensor) -> Tensor:
    out = x * 2
    out[:, 1] = 0.5
    return out * x


def _dropout(ctx: Interpreter, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _dropout_call(ctx, func, *args, **kwargs)


def _dropout_call(ctx: Interpreter, func: Callable[..., Any], input: Tensor, p: float = 0.5, training: bool = True,
                  inplace: bool = False) -> Any:
    if training and p > 0:
        raise Unsupported(f"{func.__name__} in training mode (a random mask)")
    y = input.clone()
    return ctx.emit(y, [(_traced(ctx, input), Identity(input.shape, y.shape))])


def_rule("dropout", named("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"),
         _dropout, "linear", lambda x: F.dropout(x, 0.3, training=False) * x)
