"""What autojac learns about f by running it, once per signature.

- output: f(x) must be one floating tensor of shape (B, *out); the per-sample out shape.
- batch independence: no sample's input may move another sample's output. Checked for every
  pair of samples with 1 + ceil(log4 B) vector-Jacobian products with random seeds (so that no
  structure of f, such as a softmax over the batch, can cancel it); see `_coupling`. B == 1
  is independent.
- determinism: two calls of f on the same x agree within the dtype's tolerance.
- vmap: f runs under torch.func.vmap on single samples and agrees with the batched call.
- activations: bytes f saves for backward over the whole batch, for memory estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from .numerics import agree
from .norms import fused_norm
from .problem import BatchedFn, Problem, check_output, hint_unbatched
from .strategies.basis import one_sample, per_sample


@dataclass(frozen=True)
class Probes:
    out_shape: tuple[int, ...]
    batch_independent: bool
    vmap_ok: bool
    deterministic: bool
    activations: int  # bytes saved for backward by one forward of the whole batch
    out_dtype: torch.dtype = torch.float32  # f's output dtype (a float32 model fed float64 gives float32)
    coupling: str = ""  # why f is not batch-independent, when it is not
    vmap_error: str = ""  # why vmap failed, when it did
    nondeterminism: str = ""  # how two calls differed, when they did
    fused_norm: str = ""  # a fused normalization in f's graph (norms.py), if any


def run_probes(f: BatchedFn, x: Tensor, batch_independent: bool | None = None,
               problem: Problem | None = None) -> Probes:
    """Run f a few times on a copy of x and report what it is; see the module docstring. With the
    call's `problem`, the vmap probe slices its extra arguments per sample too."""
    x = x.detach()
    copy = x.clone()  # f runs on a copy: an f that writes into its input cannot touch the caller's x
    with torch.enable_grad():
        xg = copy.detach().requires_grad_(True)  # shares copy's version counter
        with hint_unbatched(x):  # f failing on an x of shape (n,) gets a hint
            y, activations = _call_counting_saved(f, xg)
        _check_unchanged(copy, x)
        out_shape = check_output(y, x)
        coupling = ""
        if batch_independent is None:
            coupling = _coupling(y, xg)
            independent = not coupling
        else:
            independent = batch_independent
    with torch.no_grad():
        again = f(copy)
    _check_unchanged(copy, x)
    same, diff, allowed = agree(again, y.detach())
    nondeterminism = "" if same else f"two calls on the same x differ by up to {diff:.3g} (allowed {allowed:.3g})"
    vmap_error = _vmap_error(f, copy, y.detach(), problem)
    return Probes(
        out_shape=out_shape, batch_independent=independent, vmap_ok=not vmap_error,
        deterministic=same, activations=activations, out_dtype=y.dtype, coupling=coupling, vmap_error=vmap_error,
        nondeterminism=nondeterminism, fused_norm=fused_norm(y),
    )


_IN_PLACE = (
    "f modifies its input in place ({how}); autojac calls f several times on the same x and "
    "differentiates with respect to it, so f must not write into x. Use out-of-place operations "
    "(x = x * 2 instead of x *= 2, torch.relu(x) instead of x.relu_()), or clone x first inside f"
)


def _call_counting_saved(f: BatchedFn, xg: Tensor) -> tuple[Tensor, int]:
    """f(xg) and the bytes it saves for backward. An f that runs torch.func.grad (or vjp) inside
    refuses saved-tensor hooks: it runs again without, and its input's and output's sizes stand in."""
    saved = _SavedBytes()
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            return _call_refusing_in_place(f, xg), saved.total
    except RuntimeError as error:
        if "saved tensor hooks" not in str(error):
            raise
    y = _call_refusing_in_place(f, xg)
    return y, (xg.numel() + (y.numel() if isinstance(y, Tensor) else 0)) * xg.element_size()


def _call_refusing_in_place(f: BatchedFn, xg: Tensor) -> Tensor:
    try:
        return f(xg)
    except RuntimeError as error:
        if "leaf Variable that requires grad" in str(error) or "view of a leaf Variable" in str(error):
            raise ValueError(_IN_PLACE.format(how="autograd refused an in-place operation on it")) from None
        raise


def _check_unchanged(copy: Tensor, x: Tensor) -> None:
    same = (copy == x) | (copy.isnan() & x.isnan())
    if not bool(same.all()):
        raise ValueError(_IN_PLACE.format(how="x changed during a call of f"))


class _SavedBytes:
    """Counts distinct tensors that autograd saves, skipping parameters (they exist anyway)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[tuple[int, int]] = set()

    def pack(self, tensor: Tensor) -> Tensor:
        base = tensor if tensor._base is None else tensor._base  # nn.Linear saves weight.t(), a view
        if not (base.is_leaf and base.requires_grad):
            try:
                key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):  # storage-less tensors
                key = (id(tensor), tensor.numel() * tensor.element_size())
            if key not in self._seen:
                self._seen.add(key)
                self.total += key[1]
        return tensor


def _coupling(y: Tensor, xg: Tensor) -> str:
    """Empty if each sample's output depends on its own input only, else why not.

    One vector-Jacobian product seeds every sample with a random r[b]; then, for each base-4
    digit of the sample index, another seeds r[b] * 2**digit(b). Each backward operation is
    linear in its seed and scaling by a power of two is exact in floating point, so for a
    batch-independent f every sample's gradient comes back scaled by exactly its own factor;
    a sample that received anything from a sample of another factor does not. That covers
    every pair of samples in 1 + ceil(log4 B) backward passes. A mismatch is confirmed by an
    exact test (seeded on the other factors' samples only, the gradient must be zero), so
    rounding or a nondeterministic kernel cannot make f look coupled.
    """
    batch = xg.shape[0]
    if batch == 1 or not y.requires_grad:
        return ""
    generator = torch.Generator(device=y.device).manual_seed(0)
    # Only samples with finite inputs are seeded: 0 * NaN on another sample is NaN, not coupling.
    finite = xg.detach().reshape(batch, -1).isfinite().all(dim=1)
    seed = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device) * _per_sample(finite, y)
    base = _pullback(y, xg, seed)
    if base is None:  # y does not depend on x at all
        return ""
    index = torch.arange(batch, device=y.device)
    for place in range(max(1, math.ceil(math.log(batch, 4)))):
        factor = torch.pow(2.0, (index // 4**place) % 4).to(y.dtype)  # 1, 2, 4 or 8 per sample
        scaled = cast(Tensor, _pullback(y, xg, seed * _per_sample(factor, y)))  # not None: base is not
        expected = base * _per_sample(factor, base)
        differs = (scaled != expected) & (scaled.isfinite() | expected.isfinite())
        reason = _confirmed(y, xg, seed, finite, differs, lambda sample: factor != factor[sample])
        if reason:
            return reason
    return ""


def _confirmed(y: Tensor, xg: Tensor, seed: Tensor, finite: Tensor, differs: Tensor,
               other_than: Callable[[int], Tensor]) -> str | None:
    """For the first sample whose scaled gradient differs, the exact test: seeded only on the
    samples `other_than(sample)` marks, its gradient must be exactly zero. The reason f is coupled,
    "" when the difference was rounding (the exact test found nothing), None when nothing differed."""
    batch = xg.shape[0]
    for sample in differs.reshape(batch, -1).any(dim=1).nonzero().flatten().tolist():
        others = finite & other_than(sample)
        grad = cast(Tensor, _pullback(y, xg, seed * _per_sample(others, y)))[sample]
        if bool((grad.ne(0) & grad.isfinite()).any()):
            seeded = others.nonzero().flatten().tolist()
            shown = ", ".join(map(str, seeded[:5])) + (", ..." if len(seeded) > 5 else "")
            return (f"a vector-Jacobian product seeded on sample(s) {shown} is nonzero on sample {sample}: "
                    f"outputs depend on other samples' inputs")
        return ""  # rounding, not coupling: the exact test found nothing
    return None


def quick_coupling(f: BatchedFn, x: Tensor, generator: torch.Generator) -> str:
    """A cheap randomized re-check of batch independence at this x: "" or why f mixes samples.

    One forward pass and two vector-Jacobian products (vectorized) whose seeds differ by a random
    power of two per sample: for a batch-independent f each sample's gradient scales by exactly
    its own factor. Coupling between two samples escapes one check only if they drew the same
    factor (1 in 16, less for coupling among many samples); a mismatch is confirmed exactly, as
    in the probe. About the cost of one call of a first-order strategy."""
    batch = x.shape[0]
    if batch == 1:
        return ""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        y = f(xg)
        if not isinstance(y, Tensor) or not y.requires_grad:
            return ""
        finite = xg.detach().reshape(batch, -1).isfinite().all(dim=1)
        seed = torch.randn(y.shape, generator=generator, device="cpu").to(y) * _per_sample(finite, y)
        levels = 8 if torch.finfo(y.dtype).bits > 16 else 4  # no overflow in half precision
        factor = torch.pow(2.0, torch.randint(0, levels, (batch,), generator=generator)).to(y)
        grads = _pullbacks(y, xg, torch.stack([seed, seed * _per_sample(factor, y)]))
        if grads is None:
            return ""
        base, scaled = grads
        expected = base * _per_sample(factor, base)
        differs = (scaled != expected) & (scaled.isfinite() | expected.isfinite())
        return _confirmed(y, xg, seed, finite, differs, lambda sample: factor != factor[sample]) or ""


def _pullbacks(y: Tensor, xg: Tensor, seeds: Tensor) -> Tensor | None:
    """Vector-Jacobian products for each of seeds (k, *y.shape): (k, *xg.shape); one at a time where
    the backward pass cannot be vectorized."""
    try:
        (grads,) = torch.autograd.grad(y, xg, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True)
    except RuntimeError:
        rows = [_pullback(y, xg, seed) for seed in seeds]
        if rows[0] is None:
            return None
        return torch.stack(rows)  # type: ignore[arg-type]
    return grads


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) values shaped to broadcast over `like` (B, ...), in its dtype."""
    return values.to(like.dtype).view(-1, *(1,) * (like.dim() - 1))


def _pullback(y: Tensor, xg: Tensor, seed: Tensor) -> Tensor | None:
    (grad,) = torch.autograd.grad(y, xg, seed, retain_graph=True, allow_unused=True)
    return grad


def _shared_container_hint(problem: Problem) -> str:
    """Why vmap may have failed: a list, tuple or dict in args holding tensors of the batch size is
    shared (in_dims takes an int or None per argument), so every sample gets all of them."""
    for i, (a, d) in enumerate(zip(problem.args, problem.arg_dims)):
        items = a.values() if isinstance(a, dict) else a if isinstance(a, (list, tuple)) else ()
        if d is None and any(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == problem.batch for t in items):
            return (f". args[{i}] is a {type(a).__name__} holding tensors of the batch size {problem.batch}, which "
                    f"every sample receives whole (in_dims gives each argument an int or None, not a structure); "
                    f"to have them split per sample, pass those tensors as arguments of their own")
    return ""


def _vmap_error(f: BatchedFn, x: Tensor, y: Tensor, problem: Problem | None = None) -> str:
    """Empty if vmap over single samples works and agrees with f, else the reason."""
    try:
        with torch.no_grad():
            if problem is None:
                single = vmap(one_sample(f))(x[:1])
            else:
                single = per_sample(problem.head(1).replace(x=x[:1]), lambda f_one: f_one)
    except Exception as error:  # any failure means "do not use vmap": the reason is reported
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        hint = _shared_container_hint(problem) if problem is not None else ""
        return reason.rstrip(".") + hint if hint else reason
    same, diff, _ = agree(single, y[:1])
    return "" if same else f"vmap over single samples differs from the batched call by {diff:.3g}"
