"""The recomputing block as one autograd Function.

Forward runs Conv3d -> norm-act twice (optionally plus a residual) without autograd and keeps
only the block input, the per-unit batch statistics (O(C)) and the parameters. Backward
recomputes the inside by replaying those statistics (no second reduction, the same
normalization bit for bit, running statistics untouched), then backpropagates by hand:
convolutions through ATen (`convolution_backward`: cuDNN on GPUs), norm-act through effseg's
kernels. Because the pre-activation is recomputed, exact ReLU works here: the norm runs with the
identity and ReLU is applied on top, its mask taken from the recomputed pre-activation.

Mixed precision: under autocast the convolutions run in the autocast dtype, in forward and in
the recomputation alike; gradients come back in each input's own dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._library import op
from .norm_act import batch_stats
from .sync import SyncGroup, input_grad_sums


@dataclass
class Unit:
    """One Conv3d -> norm -> activation unit, as the Function sees it."""

    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    groups: int
    per_sample: bool
    use_batch_stats: bool
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    momentum: float
    eps: float
    activation: str  # "relu" runs the norm with the identity and ReLU after it
    activation_param: float
    sync: SyncGroup | None = None  # batch statistics and backward sums over a process group

    @property
    def fused_activation(self) -> tuple[str, float]:
        return ("identity", 0.0) if self.activation == "relu" else (self.activation,
                                                                    self.activation_param)


@dataclass
class BlockSpec:
    units: tuple[Unit, Unit]
    residual: bool
    skip_stride: tuple[int, int, int]
    compute_dtype: torch.dtype
    # Keep the block output (the second unit's output) for backward, so that only the first
    # unit is recomputed. Only where the output is that unit's output (no residual) and it
    # determines the pre-activation (not ReLU).
    keep_output: bool = False

    @property
    def keeps_output(self) -> bool:
        return self.keep_output and not self.residual and self.units[1].activation != "relu"


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _conv(x, w, u: Unit):
    z = torch.nn.functional.conv3d(x, w, None, u.stride, u.padding, u.dilation, u.groups)
    return z.contiguous(memory_format=_layout(x))


def _norm_act_(z, u: Unit, stats, gamma, beta):
    """Normalizes z in place with `stats`; returns (pre-activation holder, unit output)."""
    act, param = u.fused_activation
    op("norm_act_forward_", z.device)(z, stats[0], stats[1], gamma, beta, u.eps, act, param)
    if u.activation == "relu":
        return z, torch.relu(z)
    return z, z


def _unit_stats(z, u: Unit):
    if not u.use_batch_stats:
        return u.running_mean, u.running_var
    return batch_stats(z, u.per_sample, u.sync, u.running_mean, u.running_var, u.momentum)


def block_forward(x, spec: BlockSpec, w1, g1, b1, w2, g2, b2, w_skip, stats=None, units=2):
    """The block's forward without autograd. With `stats` (recompute) the given statistics are
    replayed; otherwise they are computed (and running statistics updated). Returns the output,
    the statistics, and each unit's (pre-activation, output) pair. `units=1` stops after the
    first unit (recompute with a kept output)."""
    cd = spec.compute_dtype
    h = x.to(cd)
    units_out, used = [], []
    params = list(zip(spec.units, (w1, w2), (g1, g2), (b1, b2)))[:units]
    for i, (u, w, g, b) in enumerate(params):
        z = _conv(h, w.to(cd), u)
        st = stats[i] if stats is not None else _unit_stats(z, u)
        pre, h = _norm_act_(z, u, st, g, b)
        units_out.append((pre, h))
        used.append(st)
    out = h
    if spec.residual:
        xs = x.to(cd)
        skip = xs if w_skip is None else torch.nn.functional.conv3d(
            xs, w_skip.to(cd), None, spec.skip_stride)
        out = h + skip
    return out, used, units_out


def _conv_backward(grad, inp, w, u_stride, u_padding, u_dilation, groups, need_input):
    return torch.ops.aten.convolution_backward(
        grad, inp, w, None, list(u_stride), list(u_padding), list(u_dilation), False, [0, 0, 0],
        groups, [need_input, True, False])[:2]


def _norm_act_backward(pre, dy, u: Unit, stats, gamma, beta, owned: bool):
    """dL/dz of one unit from dL/dy. `owned`: dy is ours to overwrite."""
    if u.activation == "relu":
        dy = torch.ops.aten.threshold_backward(dy, pre, 0)
        owned = True
    act, param = u.fused_activation
    dy = dy.to(pre.dtype).contiguous(memory_format=_layout(pre))
    per_group = stats[1].dim() == 2
    s_dz, s_dzx = op("norm_act_backward_reduce", pre.device)(pre, dy, gamma, beta, per_group,
                                                             act, param)
    sums = input_grad_sums(s_dz, s_dzx, pre, u.sync) if u.use_batch_stats else (None,) * 3
    var = stats[1]
    if owned:
        op("norm_act_backward_input_", pre.device)(pre, dy, var, gamma, beta, *sums, u.eps,
                                                   act, param)
        dz = dy
    else:
        dz = op("norm_act_backward_input", pre.device)(pre, dy, var, gamma, beta, *sums,
                                                       u.eps, act, param)
    if per_group:
        s_dz, s_dzx = s_dz.sum(0), s_dzx.sum(0)
    return dz, s_dzx, s_dz


class RecomputeBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: BlockSpec, w1, g1, b1, w2, g2, b2, w_skip):
        out, stats, _ = block_forward(x, spec, w1, g1, b1, w2, g2, b2, w_skip)
        (m1, v1), (m2, v2) = stats
        # Statistics are copied (O(C)) so that later updates of running buffers (eval-mode
        # units normalize with them) cannot change what backward replays.
        ctx.save_for_backward(x, w1, g1, b1, w2, g2, b2, w_skip, m1.clone(), v1.clone(),
                              m2.clone(), v2.clone(), out if spec.keeps_output else None)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, g1, b1, w2, g2, b2, w_skip, m1, v1, m2, v2, kept = ctx.saved_tensors
        spec = ctx.spec
        cd = spec.compute_dtype
        u1, u2 = spec.units
        with torch.no_grad():
            _, _, recomputed = block_forward(x, spec, w1, g1, b1, w2, g2, b2, w_skip,
                                             stats=((m1, v1), (m2, v2)),
                                             units=1 if kept is not None else 2)
            pre1, y1 = recomputed[0]
            pre2 = kept if kept is not None else recomputed[1][0]
            del recomputed
            dz2, dg2, db2 = _norm_act_backward(pre2, grad_out.to(cd), u2, (m2, v2), g2,
                                               b2, owned=False)
            del pre2
            dy1, dw2 = _conv_backward(dz2, y1, w2.to(cd), u2.stride, u2.padding, u2.dilation,
                                      u2.groups, True)
            del dz2, y1
            dz1, dg1, db1 = _norm_act_backward(pre1, dy1, u1, (m1, v1), g1, b1,
                                               owned=True)
            del pre1, dy1
            need_x = ctx.needs_input_grad[0]
            xc = x.to(cd)
            dx, dw1 = _conv_backward(dz1, xc, w1.to(cd), u1.stride, u1.padding, u1.dilation,
                                     u1.groups, need_x)
            dw_skip = None
            if spec.residual:
                g = grad_out.to(cd)
                if w_skip is None:
                    dx_skip = g
                else:
                    dx_skip, dw_skip = _conv_backward(g, xc, w_skip.to(cd), spec.skip_stride,
                                                      (0, 0, 0), (1, 1, 1), 1, need_x)
                    dw_skip = dw_skip.to(w_skip.dtype)
                if need_x:
                    dx = dx + dx_skip
        return (None if dx is None else dx.to(x.dtype), None, dw1.to(w1.dtype),
                None if g1 is None else dg1.to(g1.dtype), None if b1 is None else db1.to(b1.dtype),
                dw2.to(w2.dtype), None if g2 is None else dg2.to(g2.dtype),
                None if b2 is None else db2.to(b2.dtype), dw_skip)
