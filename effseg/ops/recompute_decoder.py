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
full-resolution level, the step's memory peak) the norm-act backwards are written into the
pre-activations' own storage and the second convolution's input gradient over its output
gradient, slab by slab (`second_conv_backward`), so that at most three tensors of the level's size
(the skip, and two of the block's) live at once; with a head the lean level also runs as three
Functions (`decoder_block`). Upsampling: folded into the convolution after it where that is
cheaper (`effseg.ops.folded_up`); unfolded, `up` is recomputed when backward needs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .folded_up import (add_folded_conv_, folded_conv, folded_weight, folded_weight_backward,
                        folds)
from .recompute import (Unit, _conv, _conv_backward, _layout, _norm_act_, _norm_act_backward,
                        _unit_stats, conv_backend, conv_input_grad, converted, blocks_of,
                        keep_output, norm_act_backward_into, second_conv_backward, shape_only,
                        sole_tensor, take_output)


@dataclass
class DecoderSpec:
    up_stride: tuple[int, int, int]
    units: tuple[Unit, Unit]
    compute_dtype: torch.dtype
    keep_output: bool = False
    lean: bool = False
    # Fold the upsampling into the convolution after it where that costs fewer multiply-adds
    # (`effseg.ops.folded_up`): the full-resolution upsampled tensor never exists.
    fold: bool = True

    @property
    def keeps_output(self) -> bool:
        return self.keep_output and self.units[1].activation != "relu"

    @property
    def is_lean(self) -> bool:
        return self.lean and not self.keeps_output and all(u.activation != "relu"
                                                           for u in self.units)


def _upsample(low, skip, spec: "DecoderSpec", w_up):
    up = F.conv_transpose3d(low.to(spec.compute_dtype), w_up, None, spec.up_stride)
    return up.contiguous(memory_format=_layout(skip))


def concatenates(skip, w_skip, w_cat_up, u1: Unit, dtype=None) -> bool:
    """Whether the skip fusion runs as one convolution over cat(skip, up): where ATen would put
    the concatenating convolution on oneDNN but one of the halves elsewhere (its slow kernel).
    Asked for convolutions in `dtype` (default: the weight's), with memoryless stand-ins."""
    if skip.device.type != "cpu" or u1.groups != 1:
        return False
    N, Cs = skip.shape[:2]
    Cu = w_cat_up.shape[1]
    spatial = tuple(skip.shape[2:])
    w = tuple(w_skip.shape)
    like = skip.new_empty((), dtype=dtype or w_skip.dtype)

    def backend(cin):
        return conv_backend((N, cin) + spatial, like, (w[0], cin) + w[2:], u1.stride, u1.padding)
    whole = backend(Cs + Cu)
    mkldnn = int(torch._C._ConvBackend.Mkldnn)
    return whole == mkldnn and (backend(Cs) != whole or backend(Cu) != whole)


def _fused_conv(low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, w_cat=None, K=None,
                slabs=None):
    """conv(cat(skip, upsample(low))), the first unit's pre-activation (weights in the compute
    dtype): over the concatenation (`w_cat`), folded (`K`, the folded weight; `slabs` parts
    for the folded half, see `add_folded_conv_`), or as two convolutions summed."""
    cd = spec.compute_dtype
    u1 = spec.units[0]
    if K is not None:
        z = _conv(skip.to(cd), w_skip, u1)
        if slabs:
            add_folded_conv_(z, low.to(cd), K, spec.up_stride, u1.padding, slabs)
        else:
            z += folded_conv(low.to(cd), K, spec.up_stride, u1.padding)
        return z
    up = _upsample(low, skip, spec, w_up)
    if w_cat is not None:
        return _conv(torch.cat([skip.to(cd), up], 1), w_cat, u1)
    z = _conv(up, w_cat_up, u1)
    del up
    z += _conv(skip.to(cd), w_skip, u1)
    return z


def decoder_forward(low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2,
                    w_cat=None, K=None, stats=None, units=2):
    """Forward without autograd (weights in the compute dtype); returns (output, statistics,
    [(pre, out) per unit]). `w_cat` (the concatenating weight) when the fusion concatenates, `K`
    (the folded weight) when it folds the upsampling.

    Unfolded, `up` (full resolution, the width of the skip) lives only until its convolution is
    done; backward computes it again when it needs it (one transposed convolution from the
    coarser level: a fraction of the level's convolutions, and one full-resolution tensor less
    at the network's memory peak)."""
    u1, u2 = spec.units
    z = _fused_conv(low, skip, spec, w_up, w_skip, w_cat_up, w_cat, K)
    st1 = stats[0] if stats is not None else _unit_stats(z, u1)
    pre1, y1 = _norm_act_(z, u1, st1, g1, b1)
    outs, used = [(pre1, y1)], [st1]
    if units == 2:
        z2 = _conv(y1, w2, u2)
        st2 = stats[1] if stats is not None else _unit_stats(z2, u2)
        outs.append(_norm_act_(z2, u2, st2, g2, b2))
        used.append(st2)
    return outs[-1][1], used, outs


def fusion_plan(low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up) -> tuple[bool, bool]:
    """(concatenate, fold): how the level fuses its skip connection (`concatenates`, `folds`)."""
    u1 = spec.units[0]
    cat = concatenates(skip, w_skip, w_cat_up, u1, spec.compute_dtype)
    fold = spec.fold and not cat and folds(tuple(low.shape), tuple(w_up.shape),
                                           tuple(w_cat_up.shape), u1.stride, u1.padding,
                                           u1.dilation, u1.groups)
    return cat, fold


def _fold_backward(dz, low, K, w_up, w_cat_up, spec: DecoderSpec, need_low: bool):
    """(dlow, dw_up, dw_cat_up) of the folded half from its output gradient `dz`; w_up and
    w_cat_up in their own dtypes (the composition runs in it)."""
    u1 = spec.units[0]
    dlow, dK = torch.ops.aten.convolution_backward(
        dz, low.to(spec.compute_dtype), K, None, list(spec.up_stride), list(u1.padding),
        [1, 1, 1], True, [0, 0, 0], 1, [need_low, True, False])[:2]
    dw_up, dw_cat_up = folded_weight_backward(dK.to(w_up.dtype), w_up, w_cat_up)
    return dlow, dw_up, dw_cat_up


def _head(y, w_head, b_head, cd):
    return F.conv3d(y, w_head, None if b_head is None else b_head.to(cd))


def _pass_weights(w_up, w_skip, w_cat_up, w2, w_head, cd, cat: bool, fold: bool):
    """The weights one pass (forward, backward) computes with, made from the parameters
    themselves, which is what the Functions save (see `converted`): (w_up, w_skip, w_cat_up,
    w2, w_head, w_cat, K), the concatenated weight `w_cat` where the level concatenates, the
    folded weight K where it folds (the upsampling and its convolution's weights then stay in
    their own dtype: the composition runs in it, and only K is converted)."""
    K = folded_weight(w_up, w_cat_up).to(cd) if fold else None
    if not fold:
        w_up, w_cat_up = converted((w_up, w_cat_up), cd)
    w_skip, w2, w_head = converted((w_skip, w2, w_head), cd)
    w_cat = torch.cat([w_skip, w_cat_up], 1) if cat else None
    return w_up, w_skip, w_cat_up, w2, w_head, w_cat, K


class DecoderBlockFunction(torch.autograd.Function):
    """The decoder level, and optionally a 1x1x1 head on its output (the network's last layer).

    With the head inside, the gradient of the level's output (full resolution, the level's
    width) is born and dies inside this backward, where it is ours to overwrite, instead of
    arriving from the head's backward and being held by autograd throughout: one
    full-resolution tensor less at the step's memory peak, and the norm's input gradient is
    written in place. (The lean level with a head runs as three Functions instead, see
    `decoder_block`.)"""

    @staticmethod
    def forward(ctx, low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2,
                w_head=None, b_head=None):
        cd = spec.compute_dtype
        ctx.weight_dtypes = [None if w is None else w.dtype
                             for w in (w_up, w_skip, w_cat_up, w2, w_head)]
        cat, fold = fusion_plan(low, skip, spec, w_up, w_skip, w_cat_up)
        weights = (w_up, w_skip, w_cat_up, w2, w_head)
        cw_up, cw_skip, cw_cat_up, cw2, cw_head, w_cat, K = _pass_weights(*weights, cd, cat,
                                                                          fold)
        out, stats, _ = decoder_forward(low, skip, spec, cw_up, cw_skip, cw_cat_up, g1, b1, cw2,
                                        g2, b2, w_cat, K)
        (m1, v1), (m2, v2) = stats
        ctx.save_for_backward(low, skip, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2, m1.clone(),
                              v1.clone(), m2.clone(), v2.clone(), w_head, b_head)
        if spec.keeps_output and w_head is None:
            keep_output(ctx, out)
        ctx.spec, ctx.cat, ctx.fold = spec, cat, fold
        if w_head is not None:
            return _head(out, cw_head, b_head, cd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (low, skip, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2, m1, v1, m2, v2,
         w_head, b_head) = ctx.saved_tensors
        kept = take_output(ctx)
        spec = ctx.spec
        cd = spec.compute_dtype
        u1, u2 = spec.units
        with torch.no_grad():
            w_up, w_skip, w_cat_up, w2, w_head, w_cat, K = _pass_weights(
                w_up, w_skip, w_cat_up, w2, w_head, cd, ctx.cat, ctx.fold)
            _, _, outs = decoder_forward(low, skip, spec, w_up, w_skip, w_cat_up, g1, b1, w2,
                                         g2, b2, w_cat, K, stats=((m1, v1), (m2, v2)),
                                         units=1 if kept is not None else 2)
            pre1, y1 = outs[0]
            pre2 = kept if kept is not None else outs[1][0]
            y2 = kept if kept is not None else outs[1][1]  # the head's input (ReLU: not pre2)
            del outs, kept
            blocks = blocks_of(pre2) if spec.is_lean else None
            held = [grad_out.to(cd), y2, pre2]
            del grad_out, y2, pre2
            dz2, dg2, db2, dw_head, db_head = _head_norm_backward(
                held, w_head, b_head, u2, (m2, v2), g2, b2, blocks)
            held = [dz2, y1]
            del dz2, y1
            dw2, dz1, dg1, db1 = _unit1_backward(held, pre1, w2, spec, (m1, v1), g1, b1,
                                                 spec.is_lean)
            del pre1
            dlow, dskip, dw_up, dw_skip, dw_cat_up = _fusion_backward(
                dz1, low, skip, spec, w_up, w_skip, w_cat_up, w_cat, K,
                ctx.needs_input_grad[:2])
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


def _unit1_backward(held: list, pre1, w2, spec: DecoderSpec, stats1, g1, b1, lean: bool):
    """(dw2, dz1, dg1, db1): the second convolution's gradients and the first unit's norm-act
    backward, from `held` = [dz2, y1], which it empties (so that each dies as soon as it is
    done with). The weight gradient comes first, so that y1 (pre1's storage but for ReLU) and
    dy1 never coexist at full size; `lean` (dz2 is ours) writes dy1 over dz2, slab by slab
    (`second_conv_backward`), so that it does not coexist with dz2 either."""
    u1, u2 = spec.units
    dy1, dw2 = second_conv_backward(held, w2, u2, owned=lean)
    dz1, dg1, db1 = _norm_act_backward(pre1, dy1, u1, stats1, g1, b1, owned=True)
    return dw2, dz1, dg1, db1


def _fusion_backward(dz1, low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, w_cat, K,
                     needs, over_dz: bool = False):
    """(dlow, dskip, dw_up, dw_skip, dw_cat_up) from the first unit's pre-activation gradient.
    The upsampling branch first: up and its gradient (unfolded) die before the skip's gradient
    (full resolution) is born."""
    cd = spec.compute_dtype
    u1 = spec.units[0]
    args = (u1.stride, u1.padding, u1.dilation, u1.groups)
    if K is not None:
        dlow, dw_up, dw_cat_up = _fold_backward(dz1, low, K, w_up, w_cat_up, spec, needs[0])
        if needs[1] and over_dz:
            # dz1 is ours alone: the skip's gradient is written over it (see
            # `second_conv_backward`), after the weight's, which reads it.
            held = [dz1, skip.to(cd)]
            del dz1
            dskip, dw_skip = second_conv_backward(held, w_skip, u1, owned=True)
        else:
            dskip, dw_skip = _conv_backward(dz1, skip.to(cd), w_skip, *args, needs[1])
        return dlow, dskip, dw_up, dw_skip, dw_cat_up
    up = _upsample(low, skip, spec, w_up)
    if w_cat is not None:
        dcat, dw_cat = _conv_backward(dz1, torch.cat([skip.to(cd), up], 1), w_cat, *args, True)
        dskip, dup = dcat.split([skip.shape[1], up.shape[1]], 1)
        dw_skip, dw_cat_up = dw_cat.split([skip.shape[1], up.shape[1]], 1)
        del up
    else:
        dw_cat_up = _conv_backward(dz1, up, w_cat_up, *args, False)[1]
        up_shape = tuple(up.shape)
        del up
        dup = conv_input_grad(dz1, up_shape, w_cat_up, *args)
    dlow, dw_up = torch.ops.aten.convolution_backward(
        dup, low.to(cd), w_up, None, list(spec.up_stride), [0, 0, 0], [1, 1, 1],
        True, [0, 0, 0], 1, [needs[0], True, False])[:2]
    del dup
    if w_cat is None:
        dskip, dw_skip = _conv_backward(dz1, skip.to(cd), w_skip, *args, needs[1])
    return dlow, dskip, dw_up, dw_skip, dw_cat_up


def _head_input_grad_block(g, w_head, n0, n1, c0, c1, d0=0, d1=None):
    """dL/d(head input) of samples n0:n1, channels c0:c1, rows d0:d1 from the head's output
    gradient `g` (contiguous: channel blocks, all rows; channels-last: row blocks, all
    channels), in g's layout: one matrix product per sample (a 1x1x1 convolution's input
    gradient), written into the block (a batched torch.matmul of the 2-D weight with the 3-D
    gradient would make a copy of its result)."""
    k, c = g.shape[1], c1 - c0
    d1 = g.shape[2] if d1 is None else d1
    w2d = w_head[:, c0:c1].reshape(k, c)
    spatial = (d1 - d0,) + tuple(g.shape[3:])
    if g.is_contiguous():
        out = g.new_empty((n1 - n0, c) + spatial)
        for i in range(n0, n1):
            torch.mm(w2d.t(), g[i, :, d0:d1].reshape(k, -1), out=out[i - n0].view(c, -1))
        return out
    # channels-last: [voxels][k] rows times the (k, c) weight
    out = torch.empty((n1 - n0, c) + spatial, dtype=g.dtype, device=g.device,
                      memory_format=torch.channels_last_3d)
    for i in range(n0, n1):
        rows = g[i:i + 1, :, d0:d1].permute(0, 2, 3, 4, 1).reshape(-1, k)
        torch.mm(rows, w2d, out=out[i - n0:i - n0 + 1].permute(0, 2, 3, 4, 1).view(-1, c))
    return out


class _FusionFunction(torch.autograd.Function):
    """The lean level's skip fusion, folded: z = conv_skip(skip) + convT(low, K). Keeps low and
    skip; backward takes dL/dz (the first unit's norm-act backward, `_NormConvFunction`)."""

    @staticmethod
    def forward(ctx, low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up):
        cd = spec.compute_dtype
        ctx.weight_dtypes = (w_up.dtype, w_skip.dtype, w_cat_up.dtype)
        (w_skip_cd,) = converted((w_skip,), cd)
        K = folded_weight(w_up, w_cat_up).to(cd)
        z = _fused_conv(low, skip, spec, None, w_skip_cd, None, K=K)
        ctx.save_for_backward(low, skip, w_up, w_skip, w_cat_up)
        ctx.spec = spec
        return z

    @staticmethod
    def backward(ctx, dz):
        low, skip, w_up, w_skip, w_cat_up = ctx.saved_tensors
        spec = ctx.spec
        with torch.no_grad():
            K = folded_weight(w_up, w_cat_up).to(spec.compute_dtype)
            (w_skip,) = converted((w_skip,), spec.compute_dtype)
            over_dz = dz.dtype == spec.compute_dtype and sole_tensor(dz)
            dlow, dskip, dw_up, dw_skip, dw_cat_up = _fusion_backward(
                dz, low, skip, spec, w_up, w_skip, w_cat_up, None, K, ctx.needs_input_grad[:2],
                over_dz)
        t_up, t_skip, t_cat_up = ctx.weight_dtypes
        return (None if dlow is None else dlow.to(low.dtype),
                dskip.to(skip.dtype) if ctx.needs_input_grad[1] else None, None,
                dw_up.to(t_up), dw_skip.to(t_skip), dw_cat_up.to(t_cat_up))


class _NormConvFunction(torch.autograd.Function):
    """The lean level's first norm-act (in place on z, the fusion's output) and second
    convolution. Keeps what recomputes z (low, skip, the fusion's weights) and O(C) statistics;
    backward recomputes z with the folded half in slabs (its gradient input dz2 is alive by
    then: no second full-size temporary), then the second convolution's gradients and the
    norm-act backward, written into the recomputed pre-activation a block at a time."""

    @staticmethod
    def forward(ctx, z, low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, g1, b1, w2):
        u1, u2 = spec.units
        ctx.set_materialize_grads(False)
        ctx.w2_dtype = w2.dtype
        (w2_cd,) = converted((w2,), spec.compute_dtype)
        m1, v1 = _unit_stats(z, u1)
        _, y1 = _norm_act_(z, u1, (m1, v1), g1, b1)
        ctx.mark_dirty(z)
        z2 = _conv(y1, w2_cd, u2)
        ctx.save_for_backward(low, skip, w_up, w_skip, w_cat_up, g1, b1, w2, m1.clone(),
                              v1.clone())
        ctx.spec = spec
        return z2, z

    @staticmethod
    def backward(ctx, dz2, _):
        low, skip, w_up, w_skip, w_cat_up, g1, b1, w2, m1, v1 = ctx.saved_tensors
        spec = ctx.spec
        cd = spec.compute_dtype
        u1 = spec.units[0]
        with torch.no_grad():
            K = folded_weight(w_up, w_cat_up).to(cd)
            w_skip, w2 = converted((w_skip, w2), cd)
            z = _fused_conv(low, skip, spec, None, w_skip, None, K=K, slabs=4)
            pre1, y1 = _norm_act_(z, u1, (m1, v1), g1, b1)
            del z, K
            held = [dz2.to(cd), y1]
            del dz2, y1
            dw2, dz1, dg1, db1 = _unit1_backward(held, pre1, w2, spec, (m1, v1), g1, b1, True)
        return (dz1, None, None, None, None, None, None,
                None if g1 is None else dg1.to(g1.dtype),
                None if b1 is None else db1.to(b1.dtype), dw2.to(ctx.w2_dtype))


def _head_norm_backward(held, w_head, b_head, u2, stats, g2, b2, blocks):
    """The 1x1x1 head's backward (none without `w_head`) and the second norm-act's, written into
    the norm's storage `pre`: a block at a time where `blocks` is given (each block of the
    head's input gradient made just before the norm reads it), else whole. `held` = [the
    logits' gradient, the head's input, pre] is emptied, so that each is released as soon as it
    is done with. The head's weight gradient comes first: its input is (but for ReLU) pre's
    storage, which the norm-act backward then overwrites. Returns (dz, dgamma, dbeta, dw_head,
    db_head)."""
    g, head_in, pre = held
    held.clear()
    head_args = ([1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1)
    dw_head = db_head = None
    if w_head is not None:
        _, dw_head, db_head = torch.ops.aten.convolution_backward(
            g, head_in, w_head, None if b_head is None else [b_head.numel()], *head_args,
            [False, True, b_head is not None])
    del head_in
    if blocks:
        if w_head is not None:
            g = g.contiguous(memory_format=_layout(pre))

            def dy_block(n0, n1, c0, c1, d0, d1):
                return _head_input_grad_block(g, w_head, n0, n1, c0, c1, d0, d1)
        else:
            def dy_block(n0, n1, c0, c1, d0, d1):
                return g[n0:n1, c0:c1, d0:d1].clone()
        dg2, db2 = norm_act_backward_into(pre, dy_block, u2, stats, g2, b2, blocks)
        return pre, dg2, db2, dw_head, db_head
    owned = w_head is not None
    if owned:
        g = torch.ops.aten.convolution_backward(
            g, shape_only(pre), w_head, None, *head_args, [True, False, False])[0]
    dz, dg2, db2 = _norm_act_backward(pre, g, u2, stats, g2, b2, owned=owned)
    return dz, dg2, db2, dw_head, db_head


class _NormHeadFunction(torch.autograd.Function):
    """The lean level's second norm-act (in place on z2) and the 1x1x1 head. Keeps the norm's
    output y2 (nobody else sees it: the block returns the head's output) and writes the head's
    and the norm's backward into it, a channel at a time: the logits' gradient, which autograd
    holds while this runs, is released before the rest of the level's backward."""

    @staticmethod
    def forward(ctx, z2, spec: DecoderSpec, g2, b2, w_head, b_head):
        u2 = spec.units[1]
        cd = spec.compute_dtype
        ctx.set_materialize_grads(False)
        ctx.dtypes = (w_head.dtype, None if b_head is None else b_head.dtype)
        (w_head_cd,) = converted((w_head,), cd)
        m2, v2 = _unit_stats(z2, u2)
        _, y2 = _norm_act_(z2, u2, (m2, v2), g2, b2)
        ctx.mark_dirty(z2)
        logits = _head(y2, w_head_cd, b_head, cd)
        ctx.save_for_backward(y2, g2, b2, w_head, b_head, m2.clone(), v2.clone())
        ctx.spec, ctx.done = spec, False
        return logits, z2

    @staticmethod
    def backward(ctx, g, _):
        if ctx.done:
            raise RuntimeError("effseg: the lean decoder level with a head overwrites what it "
                               "kept in its first backward; it cannot run backward twice "
                               "(retain_graph=True): build the network with lean=False there")
        y2, g2, b2, w_head, b_head, m2, v2 = ctx.saved_tensors
        ctx.done = True
        spec = ctx.spec
        u2 = spec.units[1]
        with torch.no_grad():
            (w_head,) = converted((w_head,), spec.compute_dtype)
            # blocks of y2's layout; the logits' gradient is read in it (a copy where it
            # comes in the other, of the logits' few channels)
            blocks = blocks_of(y2, y2.shape[1])
            held = [g.to(spec.compute_dtype), y2, y2]
            del g, y2
            dz2, dg2, db2, dw_head, db_head = _head_norm_backward(
                held, w_head, b_head, u2, (m2, v2), g2, b2, blocks)
        t_head, t_bias = ctx.dtypes
        return (dz2, None, None if g2 is None else dg2.to(g2.dtype),
                None if b2 is None else db2.to(b2.dtype), dw_head.to(t_head),
                None if db_head is None else db_head.to(t_bias))


def decoder_block(low, skip, spec: DecoderSpec, w_up, w_skip, w_cat_up, g1, b1, w2, g2, b2,
                  w_head=None, b_head=None):
    """The recomputing decoder level (with its head, if given) as autograd sees it.

    The lean level with a head, where it folds its upsampling, runs as three Functions (the
    fusion, first norm-act and second convolution, second norm-act and head), so that each
    gradient autograd hands over (the logits', then dz2, then dz1) is released when its
    Function is done instead of being held through the level's whole backward. At most three
    tensors of the level's size live at once (the skip, which the next encoder block keeps, and
    two), besides blocks and slabs of about a quarter of one. Elsewhere: one
    `DecoderBlockFunction`."""
    if w_head is not None and spec.is_lean and fusion_plan(low, skip, spec, w_up, w_skip,
                                                           w_cat_up) == (False, True):
        # The second output of each (the norm's output, in its input's storage) is dropped here:
        # z and z2 must not outlive the Function that consumes them.
        z = _FusionFunction.apply(low, skip, spec, w_up, w_skip, w_cat_up)
        z2 = _NormConvFunction.apply(z, low, skip, spec, w_up, w_skip, w_cat_up, g1, b1, w2)[0]
        del z
        return _NormHeadFunction.apply(z2, spec, g2, b2, w_head, b_head)[0]
    return DecoderBlockFunction.apply(low, skip, spec, w_up, w_skip, w_cat_up, g1, b1, w2, g2,
                                      b2, w_head, b_head)
