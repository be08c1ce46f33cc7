"""Autograd binding of the in-place activated normalization ops.

`norm_act` normalizes its input with batch statistics (training) or given statistics (eval),
applies the affine map and the activation, and writes the result into the input's storage.
For backward it saves only the output (the input's own storage), the per-group variance and
the affine parameters: backward inverts the activation and the affine map to recover xhat.
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


class NormActFunction(torch.autograd.Function):
    """y = act(weight * (x - mean) / sqrt(var + eps) + bias), written into x."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, per_sample,
                momentum, eps, activation, activation_param, sync):
        if use_batch_stats:
            mean, var = batch_stats(x, per_sample, sync, running_mean, running_var, momentum)
        else:
            # Copies (O(C)): the buffers may change before this graph's backward runs.
            mean, var = running_mean.clone(), running_var.clone()
        op("norm_act_forward_", x.device)(x, mean, var, weight, bias, eps, activation,
                                         activation_param)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, var.to(_acc(x)), weight, bias)
        ctx.use_batch_stats = use_batch_stats
        ctx.eps = eps
        ctx.activation = activation
        ctx.activation_param = activation_param
        ctx.sync = sync if use_batch_stats else None
        return x

    @staticmethod
    def backward(ctx, grad_output):
        y, var, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # The kernels read y and grad_output at the same offsets: bring grad_output into y's
        # layout (it may be an expanded or differently strided gradient).
        fmt = (torch.channels_last_3d if y.dim() == 5 else torch.channels_last) if (
            not y.is_contiguous()) else torch.contiguous_format
        dy = grad_output.to(dtype=y.dtype).contiguous(memory_format=fmt)
        if dy.stride() != y.stride():
            # Dense in torch's sense but strided otherwise along a size-1 dimension (a channel
            # slice of a batch of one, as the backward of torch.cat hands out).
            dy = torch.empty_like(y).copy_(dy)
        per_group = var.dim() == 2
        sums = None
        if ctx.use_batch_stats or need_w or need_b:
            sums = op("norm_act_backward_reduce", y.device)(
                y, dy, weight, bias, per_group, ctx.activation, ctx.activation_param)
        dx = dweight = dbias = None
        if need_x:
            sum_dz, sum_dz_xhat, count = input_grad_sums(*sums, y, ctx.sync) if (
                ctx.use_batch_stats) else (None, None, None)
            dx = op("norm_act_backward_input", y.device)(
                y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, ctx.eps, ctx.activation,
                ctx.activation_param)
        if need_w or need_b:
            sum_dz, sum_dz_xhat = (s.sum(0) if per_group else s for s in sums)
            if need_w:
                dweight = sum_dz_xhat.to(weight.dtype)
            if need_b:
                dbias = sum_dz.to(bias.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None, None, None


def norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
             use_batch_stats: bool, per_sample: bool, momentum: float, eps: float,
             activation: str, activation_param: float,
             sync: SyncGroup | None = None) -> torch.Tensor:
    """Arguments are trusted here; effseg.functional checks them. `sync`: combine the batch
    statistics and backward sums over a process group (batch norm only)."""
    return NormActFunction.apply(x, weight, bias, running_mean, running_var, use_batch_stats,
                                 per_sample, momentum, eps, activation, activation_param, sync)
