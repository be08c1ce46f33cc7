"""The recomputing block as two autograd Functions: its first convolution, and the rest.

`RecomputeBlockFunction` runs the whole block as one Function, so autograd holds the gradient
of the block's output until the block's whole backward returns, also while the block computes
the gradient of its input, the largest tensor of its backward when the block's first
convolution is strided (the input is 2^3 times the output's size). Split at the first unit's
pre-activation z1 (same numbers, same recomputation), that gradient and the block's own
tensors are released before the input's gradient is born:

    z1  = FirstConv(x)                      keeps x (shared with the block below)
    out = Rest(z1, x)                       norm-act in place on z1, the second unit; keeps x
                                            (to recompute z1), O(C) statistics, and the output
                                            where `keep_output`

Rest's backward recomputes z1 from x and returns dL/dz1; FirstConv's turns it into dL/dx and
the first weight's gradient. Only for blocks without residual and without ReLU (the fused
activation is then the unit's output).
"""
from __future__ import annotations

import torch

from .recompute import (BlockSpec, _conv, _conv_backward, _norm_act_, _norm_act_backward,
                        _unit_stats, converted, keep_output, take_output)


def splits(spec: BlockSpec) -> bool:
    """Whether a block of this spec can run split (no residual, no ReLU, not lean)."""
    return (not spec.residual and not spec.is_lean
            and all(u.activation != "relu" for u in spec.units))


class _FirstConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: BlockSpec, w1):
        (w1c,) = converted((w1,), spec.compute_dtype)
        ctx.save_for_backward(x, w1)
        ctx.spec = spec
        return _conv(x.to(spec.compute_dtype), w1c, spec.units[0])

    @staticmethod
    def backward(ctx, dz1):
        x, w1 = ctx.saved_tensors
        spec = ctx.spec
        cd = spec.compute_dtype
        u1 = spec.units[0]
        with torch.no_grad():
            (w1c,) = converted((w1,), cd)
            dx, dw1 = _conv_backward(dz1.to(cd), x.to(cd), w1c, u1.stride, u1.padding,
                                     u1.dilation, u1.groups, ctx.needs_input_grad[0])
        return None if dx is None else dx.to(x.dtype), None, dw1.to(w1.dtype)


class _RestFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, x, spec: BlockSpec, w1, g1, b1, w2, g2, b2):
        u1, u2 = spec.units
        ctx.set_materialize_grads(False)
        (w2c,) = converted((w2,), spec.compute_dtype)
        st1 = _unit_stats(z1, u1)
        _, y1 = _norm_act_(z1, u1, st1, g1, b1)
        ctx.mark_dirty(z1)
        z2 = _conv(y1, w2c, u2)
        st2 = _unit_stats(z2, u2)
        _, out = _norm_act_(z2, u2, st2, g2, b2)
        (m1, v1), (m2, v2) = st1, st2
        ctx.save_for_backward(x, w1, g1, b1, w2, g2, b2, m1.clone(), v1.clone(), m2.clone(),
                              v2.clone())
        if spec.keeps_output:
            keep_output(ctx, out)
        ctx.spec = spec
        return out, z1

    @staticmethod
    def backward(ctx, grad_out, _):
        x, w1, g1, b1, w2, g2, b2, m1, v1, m2, v2 = ctx.saved_tensors
        spec = ctx.spec
        cd = spec.compute_dtype
        u1, u2 = spec.units
        kept = take_output(ctx)
        with torch.no_grad():
            w1c, w2c = converted((w1, w2), cd)
            pre1, y1 = _norm_act_(_conv(x.to(cd), w1c, u1), u1, (m1, v1), g1, b1)
            if kept is None:
                pre2 = _norm_act_(_conv(y1, w2c, u2), u2, (m2, v2), g2, b2)[0]
            else:
                pre2 = kept
            del kept
            dz2, dg2, db2 = _norm_act_backward(pre2, grad_out.to(cd), u2, (m2, v2), g2, b2,
                                               owned=False)
            del pre2, grad_out
            dy1, dw2 = _conv_backward(dz2, y1, w2c, u2.stride, u2.padding, u2.dilation,
                                      u2.groups, True)
            del dz2, y1
            dz1, dg1, db1 = _norm_act_backward(pre1, dy1, u1, (m1, v1), g1, b1, owned=True)
        return (dz1, None, None, None, None if g1 is None else dg1.to(g1.dtype),
                None if b1 is None else db1.to(b1.dtype), dw2.to(w2.dtype),
                None if g2 is None else dg2.to(g2.dtype),
                None if b2 is None else db2.to(b2.dtype))


def split_block(x, spec: BlockSpec, w1, g1, b1, w2, g2, b2):
    """The block's output, through the two Functions (see the module docstring)."""
    z1 = _FirstConvFunction.apply(x, spec, w1)
    # Rest's second output (its norm's output, in z1's storage) is dropped here.
    return _RestFunction.apply(z1, x, spec, w1, g1, b1, w2, g2, b2)[0]
