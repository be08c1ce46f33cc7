"""A stock batch or instance norm, out of place, with its statistics taken from the replay tape.

Inside a recomputed segment (`effseg.integrations.recompute_convert`) some stock norms cannot become an
in-place fused module: their output is modified in place afterwards (`out += residual` in a
residual block) or their activation is shared with places where no norm is fused. They still
must not reduce their statistics a second time in the recomputation, nor update their running
statistics twice. `replayed_norm` normalizes with the statistics of `effseg.ops.norm_act.
batch_stats` (recorded in the first forward, replayed in the recomputation, running statistics
updated only when fresh) and writes a new tensor, so the input may be read elsewhere and the
output may be modified in place: it keeps its input and O(C) statistics for backward, and its
backward is ATen's batch-norm backward with those statistics (the same formula as the stock
norm's, which is a batch norm over (1, N*C, ...) for instance norms).
"""
from __future__ import annotations

import torch

from .norm_act import batch_stats


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_batch(x, weight, mean, invstd, per_sample):
    """The instance-norm case as the batch norm over (1, N*C, ...) that it is."""
    if not per_sample:
        return x, weight, mean, invstd
    n, c = x.shape[:2]
    return (x.reshape(1, n * c, *x.shape[2:]), None if weight is None else weight.repeat(n),
            mean.reshape(-1), invstd.reshape(-1))


class ReplayedNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps: float, per_sample: bool):
        shape = (x.shape[0] if per_sample else 1, x.shape[1]) + (1,) * (x.dim() - 2)
        invstd = (var.to(_acc(x)) + eps).rsqrt()
        y = x - mean.to(x.dtype).reshape(shape)
        y.mul_(invstd.to(x.dtype).reshape(shape))  # one full-size tensor, not two at a time
        if weight is not None:
            y.mul_(weight.reshape((1, -1) + (1,) * (x.dim() - 2)))
        if bias is not None:
            y.add_(bias.reshape((1, -1) + (1,) * (x.dim() - 2)))
        ctx.save_for_backward(x, weight, mean.to(_acc(x)), invstd)
        ctx.eps, ctx.per_sample, ctx.has_bias = eps, per_sample, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        xb, wb, mb, ib = _as_batch(x, weight, mean, invstd, ctx.per_sample)
        need = ctx.needs_input_grad
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad.reshape(xb.shape), xb, wb, None, None, mb, ib, True, ctx.eps,
            [need[0], weight is not None and need[1], ctx.has_bias and need[2]])
        if ctx.per_sample:
            n = x.shape[0]
            dw = None if dw is None else dw.reshape(n, -1).sum(0)
            db = None if db is None else db.reshape(n, -1).sum(0)
        return (None if dx is None else dx.reshape(x.shape), dw, db, None, None, None, None)


def replayed_norm(x: torch.Tensor, weight, bias, running_mean, running_var, per_sample: bool,
                  momentum: float, eps: float) -> torch.Tensor:
    """Normalizes `x` with batch statistics from the replay tape (see the module docstring);
    `running_mean`/`running_var` (or None) are updated with `momentum` when the statistics are
    fresh."""
    with torch.no_grad():  # constants to autograd: the backward formula differentiates them
        mean, var = batch_stats(x, per_sample, None, running_mean, running_var, momentum)
    return ReplayedNormFunction.apply(x, weight, bias, mean, var, float(eps), per_sample)
