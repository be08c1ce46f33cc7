"""Autograd binding of in-place activated group normalization.

Group norm needs no kernels of its own: its statistics and backward sums are exact merges of the
per-(sample, channel) ones the instance-norm kernels compute, and its elementwise passes are the
instance-norm passes fed with per-(sample, channel) values that are the same for every channel
of a group. With G groups of K = C / G channels and S voxels per channel:

- forward: in channels-last layout the channel moments merge with equal counts,
  mean_g = mean_c(mean_c) and var_g = mean_c(var_c + (mean_c - mean_g)^2); a contiguous input's
  groups are contiguous spans, reduced directly. Expanded to (N, C) the group statistics drive
  the in-place `norm_act_forward_` with per-channel weight and bias.
- backward: with dxhat = g_c * dz (g_c the clamped weight), group norm's input gradient is
  r_g * (g_c dz - T1 / M - xhat * T2 / M), M = K * S, T1 = sum_c g_c sum_dz[n, c] and
  T2 = sum_c g_c sum_dz_xhat[n, c] over the group. The input-gradient kernel computes
  g_c * r * (dz - s1 / count - xhat * s2 / count), so it is fed s1 = T1 / g_c, s2 = T2 / g_c,
  the expanded group variance and count = M. (Summing the sums without the weights would be
  right only for a weight that is constant within each group.)
- weight, bias and PReLU slope gradients are the per-channel sums over the samples, as for
  instance norm.

Glue is O(N * C); the kernels do one reduction pass in forward, one in backward and one
elementwise pass in each, as for instance norm. Saved for backward: the output (the input's
storage), the (N, G) variance, weight, bias and slope.
"""
from __future__ import annotations

import torch

from . import replay
from ._library import op
from .norm_act import _acc, apply_, grad_sums, input_grad, layout_of
from .reference import clamp_gamma


def group_stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, G) mean and biased variance of each sample's groups of channels."""
    N, C = x.shape[:2]
    if x.is_contiguous():
        # A group's channels are one contiguous span: reduce it directly as (N, G, K * S).
        return op("norm_stats", x.device)(x.view(N, num_groups, -1), True)
    mean_c, var_c = op("norm_stats", x.device)(x, True)
    m = mean_c.view(N, num_groups, C // num_groups)
    mean = m.mean(2)
    var = (var_c.view_as(m) + (m - mean.unsqueeze(2)).square()).mean(2)
    return mean, var


def _expand(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, G) per-group values as (N, C), each group's value on its channels."""
    return t.repeat_interleave(channels // t.shape[1], dim=1)


class GroupNormActFunction(torch.autograd.Function):
    """y = act(weight * (x - mean_g) / sqrt(var_g + eps) + bias), written into x."""

    @staticmethod
    def forward(ctx, x, weight, bias, slope, num_groups, eps, activation, activation_param):
        C = x.shape[1]

        def compute():
            mean, var = group_stats(x, num_groups)
            return _expand(mean, C), _expand(var, C)

        # Inside a recomputation the recorded statistics are replayed (effseg.ops.replay).
        (mean, var), _ = replay.batch_stats(x, True, compute)
        apply_(x, mean, var, weight, bias, eps, activation, activation_param, slope)
        ctx.mark_dirty(x)
        group_var = var[:, ::C // num_groups].to(_acc(x)).contiguous()
        ctx.save_for_backward(x, group_var, weight, bias, slope)
        ctx.eps = eps
        ctx.activation = activation
        ctx.activation_param = activation_param
        return x

    @staticmethod
    def backward(ctx, grad_output):
        y, group_var, weight, bias, slope = ctx.saved_tensors
        need_x, need_w, need_b, need_slope = ctx.needs_input_grad[:4]
        dy = layout_of(y, grad_output)
        N, C = y.shape[:2]
        G = group_var.shape[1]
        sum_dz, sum_dz_xhat, sum_dy_z = grad_sums(y, dy, weight, bias, True, ctx.activation,
                                                  ctx.activation_param, slope)
        dx = dweight = dbias = dslope = None
        if need_x:
            g = (torch.ones(C, dtype=sum_dz.dtype, device=y.device) if weight is None
                 else clamp_gamma(weight.to(sum_dz.dtype)))

            def per_channel(s):
                t = (s * g).view(N, G, C // G).sum(2)
                return _expand(t, C) / g

            dx = input_grad(y, dy, _expand(group_var, C), weight, bias, per_channel(sum_dz),
                            per_channel(sum_dz_xhat), y.numel() // (N * G), ctx.eps,
                            ctx.activation, ctx.activation_param, slope)
        if need_w:
            dweight = sum_dz_xhat.sum(0).to(weight.dtype)
        if need_b:
            dbias = sum_dz.sum(0).to(bias.dtype)
        if need_slope:
            dslope = sum_dy_z.sum(0).to(slope.dtype)
        return dx, dweight, dbias, dslope, None, None, None, None


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, activation: str,
                   activation_param: float, slope: torch.Tensor | None = None) -> torch.Tensor:
    """Arguments are trusted here; effseg.functional checks them."""
    return GroupNormActFunction.apply(x, weight, bias, slope, num_groups, eps, activation,
                                      activation_param)
