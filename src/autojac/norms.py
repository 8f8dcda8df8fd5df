"""Normalizations as plain operations, for results that will be differentiated again.

PyTorch's fused normalization kernels (native_layer_norm, native_group_norm, native_batch_norm) have
hand-written backward formulas whose own derivatives are wrong beyond second order (pytorch#175754):
the parameter gradients of a create_graph Hessian, HVP or Laplacian of a model with LayerNorm come
out silently wrong from every autograd strategy (1.06 against 15.3 by finite differences, in one
case). Under `ExactNorms` the functional forms (F.layer_norm, F.group_norm, F.batch_norm,
F.instance_norm, which nn.LayerNorm, nn.GroupNorm, nn.BatchNorm*d and nn.InstanceNorm*d call) run
as means, variances and rsqrt instead, whose derivatives of every order autograd gets right. The
planner switches it on only where a result keeps its graph (create_graph=True) and f's graph holds a
fused normalization (`fused_norm`); elsewhere the fused kernels are right and faster, but for
strategies that differentiate a forward-mode derivative again (Strategy.nests_forward): the
derivatives of layer_norm's jvp are wrong too, even at second order, so those always run under it;
and for GroupNorm at second order, whose batched double backward fails and whose backward has no
forward-mode derivative (Planner.exact).

Running statistics are updated as the fused kernels update them (momentum, unbiased variance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

FUSED = ("NativeLayerNorm", "NativeGroupNorm", "NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm")


def fused_norm(y: Tensor) -> str:
    """The name of the first fused normalization in y's graph ("" if none): (B, *out) -> str."""
    seen: set[int] = set()
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if name.startswith(FUSED):
            return name.removesuffix("Backward0")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return ""


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _normalized(x: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x normalized over dims, with the mean and the biased variance (keepdim)."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    var = centred.square().mean(dims, keepdim=True)
    return centred * torch.rsqrt(var + eps), mean, var


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    y, _, _ = _normalized(input, dims, eps)
    return _affine(y, weight, bias, tuple(normalized_shape))


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    n, c = input.shape[:2]
    grouped = input.reshape(n, num_groups, -1)
    y, _, _ = _normalized(grouped, (2,), eps)
    return _affine(y.reshape(input.shape), weight, bias, (c,) + (1,) * (input.dim() - 2))


def _update(running: Tensor | None, value: Tensor, momentum: float) -> None:
    if running is not None:
        with torch.no_grad():
            running.mul_(1 - momentum).add_(value.detach().to(running.dtype), alpha=momentum)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    channels = (input.shape[1],) + (1,) * (input.dim() - 2)
    dims = (0, *range(2, input.dim()))
    if training or running_mean is None or running_var is None:
        y, mean, var = _normalized(input, dims, eps)
        if training:
            count = input.numel() // input.shape[1]
            _update(running_mean, mean.reshape(-1), momentum)
            _update(running_var, var.reshape(-1) * count / max(count - 1, 1), momentum)
    else:
        y = (input - running_mean.reshape(channels)) * torch.rsqrt(running_var.reshape(channels) + eps)
    return _affine(y, weight, bias, channels)


def instance_norm(input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                  weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    channels = (input.shape[1],) + (1,) * (input.dim() - 2)
    if use_input_stats or running_mean is None or running_var is None:
        y, mean, var = _normalized(input, tuple(range(2, input.dim())), eps)
        if use_input_stats:  # the running statistics average the instances' (as the fused kernel's do)
            count = input[0, 0].numel()
            _update(running_mean, mean.flatten(1).mean(0), momentum)
            _update(running_var, (var.flatten(1) * count / max(count - 1, 1)).mean(0), momentum)
    else:
        y = (input - running_mean.reshape(channels)) * torch.rsqrt(running_var.reshape(channels) + eps)
    return _affine(y, weight, bias, channels)


REPLACEMENTS: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.layer_norm: layer_norm,
    F.group_norm: group_norm,
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
}


class ExactNorms(TorchFunctionMode):
    """Run the normalizations of REPLACEMENTS as plain operations (see the module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        replacement = REPLACEMENTS.get(func)
        return (replacement or func)(*args, **(kwargs or {}))


__all__ = ["ExactNorms", "fused_norm"]
