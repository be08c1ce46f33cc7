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

`release_input=True` goes one step further where the block's input is held by nobody else once
backward reaches the first convolution (a network's second block, when the first one keeps
only its own input and the decoder that shares the skip has run its backward): FirstConv keeps
x outside `save_for_backward` (`keep_output`), computes the weight's gradient first and lets x
go before dL/dx is born, so x, its gradient and the skip's gradient from the decoder (which
autograd holds to add dL/dx to it) are never alive together. That backward then runs once: a
second one (retain_graph=True) raises.

`source` (a filled `RowsSource`: the block below is lean and recomputes its output in slabs of
rows from its own input) goes further still: neither Function keeps x at all. Rest's backward
recomputes z1 and FirstConv's backward the first weight's gradient a slab of rows at a time
from x's rows recomputed by the source, so x is freed as soon as its other consumer (the
decoder level that reads the skip) is done with it, and x and the skip's gradient never
coexist. The block below is computed twice more in slabs: time for memory.
"""
from __future__ import annotations

import torch

from .recompute import (BlockSpec, _conv, _conv_backward, _layout, _norm_act_,
                        _norm_act_backward, _unit_stats, add_conv_input_grad_, conv_backend,
                        conv_input_grad, converted, keep_output, norm_act_backward_over,
                        second_conv_backward, strided_conv_slabs, take_output,
                        weight_grad_from_rows)
from .slabs import slab_conv


def splits(spec: BlockSpec) -> bool:
    """Whether a block of this spec can run split (no residual, no ReLU, not lean)."""
    return (not spec.residual and not spec.is_lean
            and all(u.activation != "relu" for u in spec.units))


class _FirstConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: BlockSpec, w1, release_input: bool, pass_input: bool,
                source=None):
        (w1c,) = converted((w1,), spec.compute_dtype)
        ctx.release = release_input
        ctx.source = source
        ctx.set_materialize_grads(False)
        if source is not None:
            ctx.x_meta = (tuple(x.shape), x.dtype)
            ctx.save_for_backward(w1)
        elif release_input:
            keep_output(ctx, x)
            ctx.save_for_backward(w1)
        else:
            ctx.save_for_backward(x, w1)
        ctx.spec = spec
        z1 = _conv(x.to(spec.compute_dtype), w1c, spec.units[0])
        return (z1, x) if pass_input else z1

    @staticmethod
    def backward(ctx, dz1, dskip=None):
        if ctx.source is not None:
            return _first_conv_backward_from_rows(ctx, dz1, dskip)
        if ctx.release:
            x = take_output(ctx)
            if x is None:
                raise RuntimeError(
                    "effseg: a split block with release_input=True lets its input go in its "
                    "first backward; it cannot run backward twice (retain_graph=True)")
            (w1,) = ctx.saved_tensors
        else:
            x, w1 = ctx.saved_tensors
        spec = ctx.spec
        cd = spec.compute_dtype
        u1 = spec.units[0]
        args = (u1.stride, u1.padding, u1.dilation, u1.groups)
        x_dtype = x.dtype
        with torch.no_grad():
            (w1c,) = converted((w1,), cd)
            dw1 = dx = None
            if dz1 is not None:
                dz1 = dz1.to(cd)
                # The weight's gradient first, so that x can go before its own gradient is born.
                dw1 = _conv_backward(dz1, x.to(cd), w1c, *args, False)[1].to(w1.dtype)
            x_shape = tuple(x.shape)
            del x
            if dz1 is not None and ctx.needs_input_grad[0]:
                dx = conv_input_grad(dz1, x_shape, w1c, *args)
                del dz1
            dx = _add_skip_grad(dx, dskip, x_dtype)
            del dskip
        return None if dx is None else dx.to(x_dtype), None, dw1, None, None, None


def _add_skip_grad(dx, dskip, x_dtype):
    """dx added into the skip consumer's gradient (passed-on input, see `split_block`): a fresh
    tensor that nothing else reads (FullVolumeFCN's decoder makes it), ours to add into where
    its dtype is x's."""
    if dskip is None:
        return dx
    if dx is None:
        return dskip
    return dskip.add_(dx) if dskip.dtype == x_dtype else dskip + dx


def _first_conv_backward_from_rows(ctx, dz1, dskip):
    """FirstConv's backward where x is recomputed by the block below (`source`): the weight's
    gradient summed over slabs of dz1's rows, each with the rows of x it reads; the input's
    gradient from dz1 and x's shape."""
    (w1,) = ctx.saved_tensors
    spec, source = ctx.spec, ctx.source
    x_shape, x_dtype = ctx.x_meta
    u1 = spec.units[0]
    cd = spec.compute_dtype
    args = (u1.stride, u1.padding, u1.dilation, u1.groups)
    dw1 = dx = None
    with torch.no_grad():
        if dz1 is not None:
            (w1c,) = converted((w1,), cd)
            dz1 = dz1.to(cd)
            dw1 = weight_grad_from_rows(source.reader(), x_shape, dz1, w1c, u1).to(w1.dtype)
            if ctx.needs_input_grad[0]:
                if (dskip is not None and dskip.dtype == cd == x_dtype
                        and tuple(dskip.shape) == x_shape):
                    # added into the skip's gradient in slabs: no second tensor of x's size
                    add_conv_input_grad_(dskip, dz1, w1c, u1.stride, u1.padding)
                    dx, dskip = dskip, None
                else:
                    dx = conv_input_grad(dz1, x_shape, w1c, *args)
            del dz1
        dx = _add_skip_grad(dx, dskip, x_dtype)
        del dskip
    return None if dx is None else dx.to(x_dtype), None, dw1, None, None, None


class _RestFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, x, spec: BlockSpec, w1, g1, b1, w2, g2, b2, source=None):
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
        ctx.source = source
        ctx.x_shape = tuple(x.shape)
        ctx.save_for_backward(None if source is not None else x, w1, g1, b1, w2, g2, b2,
                              m1.clone(), v1.clone(), m2.clone(), v2.clone())
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
            z1 = (_conv(x.to(cd), w1c, u1) if ctx.source is None
                  else _first_conv_from_rows(ctx.source, ctx.x_shape, w1c, u1))
            pre1, y1 = _norm_act_(z1, u1, (m1, v1), g1, b1)
            del z1
            if kept is None:
                pre2 = _norm_act_(_conv(y1, w2c, u2), u2, (m2, v2), g2, b2)[0]
            else:
                pre2 = kept
            del kept
            # pre2 (kept or recomputed) is ours by now: the consumers of the block's output
            # have run their backward, so dL/dz2 is written over it.
            dz2, dg2, db2 = norm_act_backward_over(pre2, grad_out, u2, (m2, v2), g2, b2)
            del pre2, grad_out
            held = [dz2, y1]
            del dz2, y1
            dy1, dw2 = second_conv_backward(held, w2c, u2, owned=True)
            dz1, dg1, db1 = _norm_act_backward(pre1, dy1, u1, (m1, v1), g1, b1, owned=True)
        return (dz1, None, None, None, None if g1 is None else dg1.to(g1.dtype),
                None if b1 is None else db1.to(b1.dtype), dw2.to(w2.dtype),
                None if g2 is None else dg2.to(g2.dtype),
                None if b2 is None else db2.to(b2.dtype), None)


def _first_conv_from_rows(source, x_shape, w1, u1):
    """z1 = conv(x, w1) (the unit's stride and padding; undilated, ungrouped) a slab of output
    rows at a time, x's rows recomputed by `source`; on the backend the whole convolution runs
    on (`slab_conv`)."""
    reader = source.reader()
    k = tuple(w1.shape[2:])
    out = [(n + 2 * p - kk) // s + 1 for n, p, kk, s in zip(x_shape[2:], u1.padding, k,
                                                           u1.stride)]
    slab_padding = (0,) + tuple(u1.padding[1:])
    conv = slab_conv(conv_backend(x_shape, w1, tuple(w1.shape), u1.stride, u1.padding))
    z1 = None
    for r0, r1, sub in strided_conv_slabs(reader, x_shape[2], w1, u1, out[0], parts=16):
        part = conv(sub, w1, slab_padding, u1.stride)
        if z1 is None:
            z1 = torch.empty((x_shape[0], w1.shape[0], out[0]) + tuple(part.shape[3:]),
                             dtype=part.dtype, device=part.device,
                             memory_format=_layout(sub))
        z1[:, :, r0:r1] = part
        del sub, part
    return z1


def split_block(x, spec: BlockSpec, w1, g1, b1, w2, g2, b2, release_input: bool = False,
                pass_input: bool = False, source=None):
    """The block's output, through the two Functions (see the module docstring); with
    `pass_input`, (output, x'), x' an alias of x that the first convolution returns: the
    consumer of x' (a skip connection) sends its gradient to that convolution's backward, which
    adds the input gradient into it in place. So the consumer's backward must hand over a fresh
    gradient that nothing else reads (a convolution's or effseg decoder block's does; an
    addition's, which hands the same tensor to both its inputs, does not). `source`: a
    `RowsSource` the block below filled in its forward, from which backward recomputes x in
    slabs instead of keeping it (used only where filled and the first convolution is
    undilated and ungrouped)."""
    u1 = spec.units[0]
    if source is not None and not (source.ready and tuple(u1.dilation) == (1, 1, 1)
                                   and u1.groups == 1):
        source = None
    if pass_input:
        z1, passed = _FirstConvFunction.apply(x, spec, w1, release_input, True, source)
    else:
        z1 = _FirstConvFunction.apply(x, spec, w1, release_input, False, source)
    # Rest's second output (its norm's output, in z1's storage) is dropped here.
    out = _RestFunction.apply(z1, x, spec, w1, g1, b1, w2, g2, b2, source)[0]
    return (out, passed) if pass_input else out
