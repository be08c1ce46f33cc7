"""The recomputing decoder block of a U-Net as one autograd Function, with concatenation-free
skip fusion.

A U-Net decoder level computes up = ConvTranspose3d(low), then conv(cat(skip, up)) -> norm-act
-> conv -> norm-act. Here conv(cat(skip, up)) is computed as conv_skip(skip) + conv_up(up): the
same numbers (the concatenating conv's weight split along its input channels), but the
concatenated tensor never exists. Forward keeps only `low`, `skip` and O(C) statistics; backward
recomputes `up` and the units by replaying the statistics, as the encoder blocks do
(`effseg.ops.recompute`). `skip` is an encoder block's output, which the next encoder block
keeps anyway, so a decoder level adds only its low-resolution input to what a step keeps.

Backends: where ATen would run the two half-width convolutions on its slow reference kernel
(`slow_conv3d`, for small inputs on a CPU) but the concatenating one on oneDNN, as the stock
network does, the block concatenates after all: the tensors are small there, and speed is what
such a level costs. The choice is ATen's own (`torch._C._select_conv_backend`), made per call.

Backward: every convolution's weight gradient is computed before its input gradient, so that a
convolution's input and its input gradient never coexist at full size. With `lean` (the network's
full-resolution level, the step's memory peak) the two norm-act backwards are also written into
the pre-activations' own storage a quarter at a time (`norm_act_backward_into`), so that at most
three tensors of the level's size (the skip, and two of the block's) live at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .recompute import (Unit, _conv, _conv_backward, _norm_act_, _norm_act_backward, _unit_stats,
                        conv_backend, converted, blocks_of, norm_act_backward_into, shape_only)


@dataclass
class DecoderSpec:
    up_stride: tuple[int, int, int]
    units: tuple[Unit, Unit]
    compute_dtype: torch.dtype
    keep_output: bool = False
    lean: bool = False

    @property
    def keeps_output(self) -> bool:
        return self.keep_output and self.units[1].activation != "relu"

    @property
    def is_lean(self) -> bool:
        return self.lean and not self.keeps_output and all(u.activation != "relu"
                                                           for u in self.units)


def _upsample(low, skip, spec: "DecoderSpec", w_up):
    up = F.conv_transpose3d(low.to(spec.compute_dtype), w_up, None, spec.up_stride)
    return up.contiguous(memory_format=torch.channels_last_3d if _is_cl(skip) else
                         torch.contiguous_format)


def concatenates(skip, w_skip, w_cat_up, u1: Unit) -> bool:
    """Whether the skip fusion runs as one convolution over cat(skip, up): where ATen would put
    the concatenating convolution on oneDNN but one of the halves elsewhere (its slow kernel)."""
    if skip.device.type != "cpu" or u1.groups != 1:
        return False
    N, Cs = skip.shape[:2]
    Cu = w_cat_up.shape[1]
    spatial = tuple(skip.shape[2:])
    w = tuple(w_skip.shape)

    def backend(cin):
        return conv_backend((N, cin) + spatial, skip.to(w_skip.dtype), (w[0], cin) + w[2:],
                            u1.stride, u1.padding)
    whole = backend(Cs + Cu)
    mkldnn = int(torch._C._ConvBackend.Mkldnn)
    return whole == mkldnn and (backend(Cs) != whole or backend(Cu) != whole)


def decoder_forward(low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2,
                    w_cat=None, stats=None, units=2):
    """Forward without autograd (weights in the compute dtype); returns (output, statistics,
    [(pre, out) per unit]). `w_cat` (the concatenating weight) when the fusion concatenates.

    `up` (full resolution, the width of the skip) lives only until its convolution is done;
    backward computes it again when it needs it (one transposed convolution from the coarser
    level: a fraction of the level's convolutions, and one full-resolution tensor less at the
    network's memory peak)."""
    cd = spec.compute_dtype
    u1, u2 = spec.units
    up = _upsample(low, skip, spec, w_up)
    if w_cat is not None:
        z = _conv(torch.cat([skip.to(cd), up], 1), w_cat, u1)
    else:
        z = _conv(up, w_cat_up, u1)
        del up
        z += _conv(skip.to(cd), w_skip, u1)
    st1 = stats[0] if stats is not None else _unit_stats(z, u1)
    pre1, y1 = _norm_act_(z, u1, st1, g1, b1)
    outs, used = [(pre1, y1)], [st1]
    if units == 2:
        z2 = _conv(y1, w2, u2)
        st2 = stats[1] if stats is not None else _unit_stats(z2, u2)
        outs.append(_norm_act_(z2, u2, st2, g2, b2))
        used.append(st2)
    return outs[-1][1], used, outs


def _is_cl(t):
    return t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last_3d)


def _head(y, w_head, b_head, cd):
    return F.conv3d(y, w_head, None if b_head is None else b_head.to(cd))


def _chunked(full: torch.Tensor, x_shape, w: torch.Tensor, u: Unit):
    """Blocks for a chunked input gradient of a convolution (weight `w`, unit `u`) whose input
    is `full`: `blocks_of(full)`, unless a block's convolution would run on another backend than
    the whole one's (never trade speed for memory behind the user's back)."""
    blocks = blocks_of(full)
    if not blocks:
        return None
    n0, n1, c0, c1 = max(blocks, key=lambda b: (b[1] - b[0]) * (b[3] - b[2]))
    part = (n1 - n0, c1 - c0) + tuple(x_shape[2:])
    wpart = (w.shape[0], c1 - c0) + tuple(w.shape[2:])
    if conv_backend(part, full, wpart, u.stride, u.padding) != conv_backend(
            x_shape, full, tuple(w.shape), u.stride, u.padding):
        return None
    return blocks


def _input_grad_block(grad, w, u: Unit, like):
    """dL/d(input block) of a convolution: `grad` the output gradient of the block's samples,
    `w` the weight columns of the block's channels, `like` the input block (shape only)."""
    return torch.ops.aten.convolution_backward(
        grad, shape_only(like), w, None, list(u.stride), list(u.padding), list(u.dilation),
        False, [0, 0, 0], u.groups, [True, False, False])[0]


class DecoderBlockFunction(torch.autograd.Function):
    """The decoder level, and optionally a 1x1x1 head on its output (the network's last layer).

    With the head inside, the gradient of the level's output (full resolution, the level's
    width) is born and dies inside this backward, where it is ours to overwrite, instead of
    arriving from the head's backward and being held by autograd throughout: one
    full-resolution tensor less at the step's memory peak, and the norm's input gradient is
    written in place."""

    @staticmethod
    def forward(ctx, low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2,
                w_head=None, b_head=None):
        cd = spec.compute_dtype
        ctx.weight_dtypes = [None if w is None else w.dtype
                             for w in (w_up, w_skip, w_cat_up, w2, w_head)]
        w_up, w_skip, w_cat_up, w2, w_head = converted((w_up, w_skip, w_cat_up, w2, w_head), cd)
        w_cat = torch.cat([w_skip, w_cat_up], 1) if concatenates(
            skip, w_skip, w_cat_up, spec.units[0]) else None
        out, stats, _ = decoder_forward(low, skip, spec, w_up, w_skip, w_cat_up, g1, b1, w2,
                                        g2, b2, w_cat)
        (m1, v1), (m2, v2) = stats
        keep = spec.keeps_output and w_head is None
        ctx.save_for_backward(low, skip, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2, m1.clone(),
                              v1.clone(), m2.clone(), v2.clone(), out if keep else None,
                              w_head, b_head, w_cat)
        ctx.spec = spec
        if w_head is not None:
            return _head(out, w_head, b_head, cd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (low, skip, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2, m1, v1, m2, v2,
         kept, w_head, b_head, w_cat) = ctx.saved_tensors
        spec = ctx.spec
        cd = spec.compute_dtype
        u1, u2 = spec.units
        dw_head = db_head = None
        with torch.no_grad():
            _, _, outs = decoder_forward(low, skip, spec, w_up, w_skip, w_cat_up, g1, b1, w2,
                                         g2, b2, w_cat, stats=((m1, v1), (m2, v2)),
                                         units=1 if kept is not None else 2)
            pre1, y1 = outs[0]
            pre2 = kept if kept is not None else outs[1][0]
            y2 = kept if kept is not None else outs[1][1]  # the head's input (ReLU: not pre2)
            del outs
            g = grad_out.to(cd)
            del grad_out
            head_args = ([1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1)
            if w_head is not None:
                # The head's weight gradient first: its input is (but for ReLU) pre2's storage,
                # which the norm-act backward then overwrites.
                _, dw_head, db_head = torch.ops.aten.convolution_backward(
                    g, y2, w_head, None if b_head is None else [b_head.numel()], *head_args,
                    [False, True, b_head is not None])
            blocks = blocks_of(pre2) if spec.is_lean else None
            if blocks:
                if w_head is not None:
                    def dy2_block(n0, n1, c0, c1):
                        return torch.ops.aten.convolution_backward(
                            g[n0:n1], pre2[n0:n1, c0:c1], w_head[:, c0:c1], None,
                            *head_args, [True, False, False])[0]
                else:
                    def dy2_block(n0, n1, c0, c1):
                        return g[n0:n1, c0:c1].clone()
                dg2, db2 = norm_act_backward_into(pre2, dy2_block, u2, (m2, v2), g2, b2, blocks)
                dz2 = pre2
            else:
                owned = w_head is not None
                if owned:
                    g = torch.ops.aten.convolution_backward(
                        g, shape_only(pre2), w_head, None, *head_args, [True, False, False])[0]
                dz2, dg2, db2 = _norm_act_backward(pre2, g, u2, (m2, v2), g2, b2, owned=owned)
            del pre2, y2, g
            args2 = (u2.stride, u2.padding, u2.dilation, u2.groups)
            dw2 = _conv_backward(dz2, y1, w2, *args2, False)[1]
            blocks = _chunked(y1, tuple(y1.shape), w2, u2) if spec.is_lean else None
            if blocks:
                def dy1_block(n0, n1, c0, c1):
                    return _input_grad_block(dz2[n0:n1], w2[:, c0:c1], u2, y1[n0:n1, c0:c1])
                dg1, db1 = norm_act_backward_into(pre1, dy1_block, u1, (m1, v1), g1, b1, blocks)
                dz1 = pre1
                del dz2, y1
            else:
                shape = shape_only(y1)
                del y1
                dy1 = _conv_backward(dz2, shape, w2, *args2, True, False)[0]
                del dz2
                dz1, dg1, db1 = _norm_act_backward(pre1, dy1, u1, (m1, v1), g1, b1, owned=True)
                del dy1
            del pre1
            # The upsampling branch first: up and its gradient die before the skip's
            # gradient (full resolution) is born.
            args = (u1.stride, u1.padding, u1.dilation, u1.groups)
            up = _upsample(low, skip, spec, w_up)
            if w_cat is not None:
                dcat, dw_cat = _conv_backward(dz1, torch.cat([skip.to(cd), up], 1), w_cat, *args,
                                              True)
                dskip, dup = dcat.split([skip.shape[1], up.shape[1]], 1)
                dw_skip, dw_cat_up = dw_cat.split([skip.shape[1], up.shape[1]], 1)
                del up
            else:
                dw_cat_up = _conv_backward(dz1, up, w_cat_up, *args, False)[1]
                shape = shape_only(up)
                del up
                dup = _conv_backward(dz1, shape, w_cat_up, *args, True, False)[0]
            dlow, dw_up = torch.ops.aten.convolution_backward(
                dup, low.to(cd), w_up, None, list(spec.up_stride), [0, 0, 0], [1, 1, 1],
                True, [0, 0, 0], 1, [ctx.needs_input_grad[0], True, False])[:2]
            del dup
            if w_cat is None:
                dskip, dw_skip = _conv_backward(dz1, skip.to(cd), w_skip, *args,
                                                ctx.needs_input_grad[1])
            del dz1

        def back(grad, dtype):
            return None if grad is None or dtype is None else grad.to(dtype)

        t_up, t_skip, t_cat_up, t2, t_head = ctx.weight_dtypes
        return (back(dlow, low.dtype),
                back(dskip, skip.dtype) if ctx.needs_input_grad[1] else None, None,
                back(dw_up, t_up), back(dw_skip, t_skip), back(dw_cat_up, t_cat_up),
                back(dg1, None if g1 is None else g1.dtype),
                back(db1, None if b1 is None else b1.dtype), back(dw2, t2),
                back(dg2, None if g2 is None else g2.dtype),
                back(db2, None if b2 is None else b2.dtype), back(dw_head, t_head),
                back(db_head, None if b_head is None else b_head.dtype))
