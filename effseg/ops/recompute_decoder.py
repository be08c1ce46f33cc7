"""The recomputing decoder block of a U-Net as one autograd Function, with concatenation-free
skip fusion.

A U-Net decoder level computes up = ConvTranspose3d(low), then conv(cat(skip, up)) -> norm-act
-> conv -> norm-act. Here conv(cat(skip, up)) is computed as conv_skip(skip) + conv_up(up): the
same numbers (the concatenating conv's weight split along its input channels), but the
concatenated tensor never exists. Forward keeps only `low`, `skip` and O(C) statistics; backward
recomputes `up` and the units by replaying the statistics, as the encoder blocks do
(`effseg.ops.recompute`). `skip` is an encoder block's output, which the next encoder block
keeps anyway, so a decoder level adds only its low-resolution input to what a step keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .recompute import Unit, _conv, _conv_backward, _norm_act_, _norm_act_backward, _unit_stats


@dataclass
class DecoderSpec:
    up_stride: tuple[int, int, int]
    units: tuple[Unit, Unit]
    compute_dtype: torch.dtype
    keep_output: bool = False

    @property
    def keeps_output(self) -> bool:
        return self.keep_output and self.units[1].activation != "relu"


def _upsample(low, skip, spec: "DecoderSpec", w_up):
    up = F.conv_transpose3d(low.to(spec.compute_dtype), w_up.to(spec.compute_dtype), None,
                            spec.up_stride)
    return up.contiguous(memory_format=torch.channels_last_3d if _is_cl(skip) else
                         torch.contiguous_format)


def decoder_forward(low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2,
                    stats=None, units=2):
    """Forward without autograd; returns (output, statistics, [(pre, out) per unit]).

    `up` (full resolution, the width of the skip) lives only until its convolution is done;
    backward computes it again when it needs it (one transposed convolution from the coarser
    level: a fraction of the level's convolutions, and one full-resolution tensor less at the
    network's memory peak)."""
    cd = spec.compute_dtype
    u1, u2 = spec.units
    up = _upsample(low, skip, spec, w_up)
    z = _conv(up, w_cat_up.to(cd), u1)
    del up
    z += _conv(skip.to(cd), w_skip.to(cd), u1)
    st1 = stats[0] if stats is not None else _unit_stats(z, u1)
    pre1, y1 = _norm_act_(z, u1, st1, g1, b1)
    outs, used = [(pre1, y1)], [st1]
    if units == 2:
        z2 = _conv(y1, w2.to(cd), u2)
        st2 = stats[1] if stats is not None else _unit_stats(z2, u2)
        outs.append(_norm_act_(z2, u2, st2, g2, b2))
        used.append(st2)
    return outs[-1][1], used, outs


def _is_cl(t):
    return t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last_3d)


def _head(y, w_head, b_head, cd):
    return F.conv3d(y, w_head.to(cd), None if b_head is None else b_head.to(cd))


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
        out, stats, _ = decoder_forward(low, skip, spec, w_up, w_skip, w_cat_up, g1, b1, w2,
                                        g2, b2)
        (m1, v1), (m2, v2) = stats
        keep = spec.keeps_output and w_head is None
        ctx.save_for_backward(low, skip, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2, m1.clone(),
                              v1.clone(), m2.clone(), v2.clone(), out if keep else None,
                              w_head, b_head)
        ctx.spec = spec
        if w_head is not None:
            return _head(out, w_head, b_head, spec.compute_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (low, skip, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2, m1, v1, m2, v2,
         kept, w_head, b_head) = ctx.saved_tensors
        spec = ctx.spec
        cd = spec.compute_dtype
        u1, u2 = spec.units
        dw_head = db_head = None
        with torch.no_grad():
            _, _, outs = decoder_forward(low, skip, spec, w_up, w_skip, w_cat_up, g1, b1, w2,
                                         g2, b2, stats=((m1, v1), (m2, v2)),
                                         units=1 if kept is not None else 2)
            pre1, y1 = outs[0]
            pre2 = kept if kept is not None else outs[1][0]
            owned = False
            if w_head is not None:
                g = grad_out.to(cd)
                grad_out, dw_head, db_head = torch.ops.aten.convolution_backward(
                    g, outs[1][1], w_head.to(cd), None if b_head is None else [b_head.numel()],
                    [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1,
                    [True, True, b_head is not None])
                owned = True
                del g
            del outs
            dz2, dg2, db2 = _norm_act_backward(pre2, grad_out.to(cd), u2, (m2, v2), g2, b2,
                                               owned=owned)
            del pre2, grad_out
            dy1, dw2 = _conv_backward(dz2, y1, w2.to(cd), u2.stride, u2.padding, u2.dilation,
                                      u2.groups, True)
            del dz2, y1
            dz1, dg1, db1 = _norm_act_backward(pre1, dy1, u1, (m1, v1), g1, b1, owned=True)
            del pre1, dy1
            # The upsampling branch first: up and its gradient die before the skip's
            # gradient (full resolution) is born.
            args = (u1.stride, u1.padding, u1.dilation, u1.groups)
            up = _upsample(low, skip, spec, w_up)
            dup, dw_cat_up = _conv_backward(dz1, up, w_cat_up.to(cd), *args, True)
            del up
            dlow, dw_up = torch.ops.aten.convolution_backward(
                dup, low.to(cd), w_up.to(cd), None, list(spec.up_stride), [0, 0, 0], [1, 1, 1],
                True, [0, 0, 0], 1, [ctx.needs_input_grad[0], True, False])[:2]
            del dup
            dskip, dw_skip = _conv_backward(dz1, skip.to(cd), w_skip.to(cd), *args,
                                            ctx.needs_input_grad[1])
            del dz1

        def back(g, like):
            return None if g is None or like is None else g.to(like.dtype)

        return (back(dlow, low), back(dskip, skip), None, back(dw_up, w_up),
                back(dw_skip, w_skip), back(dw_cat_up, w_cat_up), back(dg1, g1), back(db1, b1),
                back(dw2, w2), back(dg2, g2), back(db2, b2), back(dw_head, w_head),
                back(db_head, b_head))
