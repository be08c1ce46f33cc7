"""Autograd binding of the in-place activated normalization ops.

`norm_act` normalizes its input with batch statistics (training) or given statistics (eval),
applies the affine map and the activation, and writes the result into the input's storage.
For backward it saves only the output (the input's own storage), the per-group variance and
the affine parameters (and PReLU's slope): backward inverts the activation and the affine map to
recover xhat.

activation "prelu" takes its (C,) slope tensor as `slope` (a learnable parameter: its gradient
comes out of the same backward reduction as the weight's and bias's).
"""
from __future__ import annotations

import torch

from . import replay
from ._library import op
from .sync import SyncGroup, global_stats, input_grad_sums, local_count


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         mean: torch.Tensor, var: torch.Tensor, count,
                         momentum: float) -> None:
    """running <- (1 - momentum) * running + momentum * batch, with the unbiased variance.

    `count` (values per group: an int, or a 0-d tensor for a global count that stays on the
    device). Per-sample statistics (N, C) are averaged over the samples first, as torch's
    instance norm does with running statistics.
    """
    unbiased = var * (count / (count - 1))
    if mean.dim() == 2:
        mean, unbiased = mean.mean(0), unbiased.mean(0)
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def batch_stats(x: torch.Tensor, per_sample: bool, sync: SyncGroup | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch statistics a norm layer normalizes with: replayed inside a recomputation, or
    reduced (over the process group when `sync`), in which case the running statistics are
    updated, with the global count."""
    count = x.numel() // x.shape[1] // (x.shape[0] if per_sample else 1)

    def compute():
        nonlocal count
        mean, var = op("norm_stats", x.device)(x, per_sample)
        if sync is not None:
            mean, var, count = global_stats(mean, var, local_count(x), sync)
        return mean, var

    (mean, var), fresh = replay.batch_stats(x, per_sample, compute)
    if fresh and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return mean, var


def apply_(x, mean, var, weight, bias, eps, activation, activation_param, slope) -> None:
    """act(weight * (x - mean) / sqrt(var + eps) + bias) into x; "prelu" uses `slope`."""
    if activation == "prelu":
        op("norm_act_forward_prelu_", x.device)(x, mean, var, weight, bias, eps, slope)
    else:
        op("norm_act_forward_", x.device)(x, mean, var, weight, bias, eps, activation,
                                         activation_param)


def grad_sums(y, dy, weight, bias, per_group, activation, activation_param, slope):
    """(sum_dz, sum_dz_xhat, sum_dy_z or None) per group; the third (PReLU's slope gradient)
    only for "prelu"."""
    if activation == "prelu":
        return op("norm_act_backward_reduce_prelu", y.device)(y, dy, weight, bias, slope,
                                                              per_group)
    s1, s2 = op("norm_act_backward_reduce", y.device)(y, dy, weight, bias, per_group,
                                                      activation, activation_param)
    return s1, s2, None


def input_grad(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, activation,
               activation_param, slope):
    """dL/dx (sum_dz / sum_dz_xhat None: fixed statistics)."""
    if activation == "prelu":
        return op("norm_act_backward_input_prelu", y.device)(
            y, dy, var, weight, bias, slope, sum_dz, sum_dz_xhat, count, eps)
    return op("norm_act_backward_input", y.device)(
        y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, activation, activation_param)


def layout_of(y: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad_output in y's dtype and memory layout: the kernels read both at the same offsets
    (the gradient may be expanded or differently strided)."""
    fmt = (torch.channels_last_3d if y.dim() == 5 else torch.channels_last) if (
        not y.is_contiguous()) else torch.contiguous_format
    return grad_output.to(dtype=y.dtype).contiguous(memory_format=fmt)


class NormActFunction(torch.autograd.Function):
    """y = act(weight * (x - mean) / sqrt(var + eps) + bias), written into x."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, per_sample,
                momentum, eps, activation, activation_param, sync, slope):
        if use_batch_stats:
            mean, var = batch_stats(x, per_sample, sync, running_mean, running_var, momentum)
        else:
            # Copies (O(C)): the buffers may change before this graph's backward runs.
            mean, var = running_mean.clone(), running_var.clone()
        apply_(x, mean, var, weight, bias, eps, activation, activation_param, slope)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, var.to(_acc(x)), weight, bias, slope)
        ctx.use_batch_stats = use_batch_stats
        ctx.eps = eps
        ctx.activation = activation
        ctx.activation_param = activation_param
        ctx.sync = sync if use_batch_stats else None
        return x

    @staticmethod
    def backward(ctx, grad_output):
        y, var, weight, bias, slope = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_slope = ctx.needs_input_grad[12]
        dy = layout_of(y, grad_output)
        per_group = var.dim() == 2
        sums = None
        if ctx.use_batch_stats or need_w or need_b or need_slope:
            sums = grad_sums(y, dy, weight, bias, per_group, ctx.activation,
                             ctx.activation_param, slope)
        dx = dweight = dbias = dslope = None
        if need_x:
            sum_dz, sum_dz_xhat, count = input_grad_sums(sums[0], sums[1], y, ctx.sync) if (
                ctx.use_batch_stats) else (None, None, None)
            dx = input_grad(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, ctx.eps,
                            ctx.activation, ctx.activation_param, slope)
        if need_w or need_b or need_slope:
            sum_dz, sum_dz_xhat, sum_dy_z = (
                None if s is None else s.sum(0) if per_group else s for s in sums)
            if need_w:
                dweight = sum_dz_xhat.to(weight.dtype)
            if need_b:
                dbias = sum_dz.to(bias.dtype)
            if need_slope:
                dslope = sum_dy_z.to(slope.dtype)
        return (dx, dweight, dbias, None, None, None, None, None, None, None, None, None,
                dslope)


def norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
             use_batch_stats: bool, per_sample: bool, momentum: float, eps: float,
             activation: str, activation_param: float,
             sync: SyncGroup | None = None, slope: torch.Tensor | None = None) -> torch.Tensor:
    """Arguments are trusted here; effseg.functional checks them. `sync`: combine the batch
    statistics and backward sums over a process group (batch norm only). `slope`: the (C,)
    PReLU slope when activation is "prelu"."""
    return NormActFunction.apply(x, weight, bias, running_mean, running_var, use_batch_stats,
                                 per_sample, momentum, eps, activation, activation_param, sync,
                                 slope)
