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


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         mean: torch.Tensor, var: torch.Tensor, count: int,
                         momentum: float) -> None:
    """running <- (1 - momentum) * running + momentum * batch, with the unbiased variance.

    Per-sample statistics (N, C) are averaged over the samples first, as torch's instance norm
    does with running statistics.
    """
    unbiased = var * (count / (count - 1))
    if mean.dim() == 2:
        mean, unbiased = mean.mean(0), unbiased.mean(0)
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_(unbiased.to(running_var.dtype), momentum)


class NormActFunction(torch.autograd.Function):
    """y = act(weight * (x - mean) / sqrt(var + eps) + bias), written into x."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, per_sample,
                momentum, eps, activation, activation_param):
        if use_batch_stats:
            (mean, var), fresh = replay.batch_stats(
                x, per_sample, lambda: op("norm_stats", x.device)(x, per_sample))
            if running_mean is not None and fresh:
                count = x.numel() // x.shape[1] // (x.shape[0] if per_sample else 1)
                update_running_stats(running_mean, running_var, mean, var, count, momentum)
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
        per_group = var.dim() == 2
        sums = None
        if ctx.use_batch_stats or need_w or need_b:
            sums = op("norm_act_backward_reduce", y.device)(
                y, dy, weight, bias, per_group, ctx.activation, ctx.activation_param)
        dx = dweight = dbias = None
        if need_x:
            sum_dz, sum_dz_xhat = sums if ctx.use_batch_stats else (None, None)
            dx = op("norm_act_backward_input", y.device)(
                y, dy, var, weight, bias, sum_dz, sum_dz_xhat, None, ctx.eps, ctx.activation,
                ctx.activation_param)
        if need_w or need_b:
            sum_dz, sum_dz_xhat = (s.sum(0) if per_group else s for s in sums)
            if need_w:
                dweight = sum_dz_xhat.to(weight.dtype)
            if need_b:
                dbias = sum_dz.to(bias.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


def norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
             use_batch_stats: bool, per_sample: bool, momentum: float, eps: float,
             activation: str, activation_param: float) -> torch.Tensor:
    """Arguments are trusted here; effseg.functional checks them."""
    return NormActFunction.apply(x, weight, bias, running_mean, running_var, use_batch_stats,
                                 per_sample, momentum, eps, activation, activation_param)
