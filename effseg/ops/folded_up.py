"""The decoder's upsampling folded into the convolution that follows it.

A U-Net decoder level upsamples its coarse input with a transposed convolution whose kernel
equals its stride s (no overlap), then convolves the result with a k x k x k kernel (stride 1,
padding (k - 1) / 2). Both are linear, and their composition is one transposed convolution of
the coarse input itself, stride s, padding (k - 1) / 2 and kernel s + k - 1 per axis:

    conv(convT(low, W_up, stride=s), W)  ==  convT(low, K, stride=s, padding=(k - 1) / 2)
    K[i, o, a + j] = sum_m W_up[i, m, a] * W[o, m, k - 1 - j]     (a < s, j < k, per axis)

which is a transposed convolution of W_up, read as a batch of Cin images of Cmid channels, with
W flipped (`folded_weight`). Computed from the coarse input, the full-resolution upsampled
tensor never exists (one tensor of the level's size less at any moment), and the multiply-adds
per output voxel drop from Cin*Cmid + Cmid*Cout*k^3 to Cin*Cout*(s+k-1)^3/s^3 (U-Net widths,
s = 2, k = 3: 16/29 of them).
Composing K costs s^3*k^3*Cin*Cmid*Cout once per pass, so a level folds only where that and the
folded convolution together cost less than the two convolutions (`folds`). The numbers equal the
unfolded ones up to rounding (the same products, summed in another order).

Backward: the weight gradient of the folded convolution, dK, gives both weights' gradients
through the composition (the composition's own convolution backward); its input gradient is the
coarse input's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .slabs import MKLDNN, slab_conv


def _flipped_transposed(w: torch.Tensor) -> torch.Tensor:
    """W (Cout, Cmid, k) as the weight of a transposed convolution from Cmid to Cout channels,
    flipped in space: Wf[m, o, j] = W[o, m, k - 1 - j]."""
    return w.flip(2, 3, 4).transpose(0, 1)


def folded_weight(w_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """K (Cin, Cout, s + k - 1 per axis) of the folded transposed convolution, from the
    upsampling weight W_up (Cin, Cmid, s) and the convolution weight W (Cout, Cmid, k): one
    transposed convolution of W_up, read as a batch of Cin images of Cmid channels and s^3
    voxels, with W flipped, K[i, o, a + j] = sum_m W_up[i, m, a] * W[o, m, k - 1 - j] (on
    oneDNN in float32/bf16: no temporary besides K, and no per-position loop of strided adds
    into K's windows)."""
    return F.conv_transpose3d(w_up, _flipped_transposed(w))


def folded_weight_backward(dK: torch.Tensor, w_up: torch.Tensor, w: torch.Tensor):
    """(dW_up, dW) from the gradient of K: the backward of `folded_weight`'s transposed
    convolution (its input and weight gradients)."""
    zeros = [0] * (w_up.dim() - 2)
    ones = [1] * (w_up.dim() - 2)
    d_up, d_wf, _ = torch.ops.aten.convolution_backward(
        dK, w_up, _flipped_transposed(w), None, ones, zeros, ones, True, zeros, 1,
        [True, True, False])
    return d_up, _flipped_transposed(d_wf).contiguous()


def folds(low_shape, w_up_shape, w_shape, stride, padding, dilation, groups) -> bool:
    """Whether upsampling (weight shape `w_up_shape`, kernel = stride) then a convolution
    (`w_shape`, `stride`, `padding`, `dilation`, `groups`) of a `low_shape` input should run
    folded: a stride-1, undilated, ungrouped 'same' convolution with an odd kernel, where the
    folded one with its composition costs fewer multiply-adds than the two."""
    k = tuple(w_shape[2:])
    if (groups != 1 or tuple(stride) != (1, 1, 1) or tuple(dilation) != (1, 1, 1)
            or any(n % 2 == 0 or p != (n - 1) // 2 for n, p in zip(k, padding))):
        return False
    cin, cmid = w_up_shape[:2]
    cout = w_shape[0]
    s = tuple(w_up_shape[2:])
    coarse = low_shape[0] * math.prod(low_shape[2:])       # samples x coarse voxels
    fine = coarse * math.prod(s)
    apart = fine * (cin * cmid + cmid * cout * math.prod(k))
    folded = coarse * cin * cout * math.prod(a + b - 1 for a, b in zip(s, k))
    compose = math.prod(s) * math.prod(k) * cin * cmid * cout
    return folded + compose < apart


def folded_conv(low: torch.Tensor, K: torch.Tensor, stride, padding) -> torch.Tensor:
    """convT(low, K) at full resolution (the upsampling and the convolution in one)."""
    return F.conv_transpose3d(low, K, None, tuple(stride), tuple(padding))


def add_folded_conv_(z: torch.Tensor, low: torch.Tensor, K: torch.Tensor, stride, padding,
                     parts: int = 4) -> None:
    """z += convT(low, K), computed in about `parts` slabs along the first spatial axis, so that
    no temporary larger than about 1/`parts` of z exists. Each slab reads the coarse rows its
    output rows need (a halo of one or two rows on each side), so the slabs add up to the whole
    exactly."""
    s, p = stride[0], padding[0]
    L = low.shape[2]
    lo_halo, hi_halo = (s - 1 + p) // s, 1 + (p - 1) // s
    rows = max(1, z.shape[2] // (parts * s) - lo_halo - hi_halo)
    if rows >= L:
        z += folded_conv(low, K, stride, padding)
        return
    for i0 in range(0, L, rows):
        i1 = min(i0 + rows, L)
        a, b = max(i0 - lo_halo, 0), min(i1 + hi_halo, L)
        part = F.conv_transpose3d(low[:, :, a:b], K, None, tuple(stride), (p,) + tuple(padding[1:]))
        # local output row r is global row r + s*a
        z[:, :, s * i0:s * i1] += part[:, :, s * (i0 - a):s * (i1 - a)]
        del part


def _whole_backend(dz_shape, like: torch.Tensor, w_shape, padding) -> int:
    from .recompute import conv_backend
    k = tuple(w_shape[2:])
    return conv_backend(tuple(dz_shape), like, (w_shape[1], w_shape[0]) + k, (1, 1, 1),
                        tuple(padding))


def slab_rows(dz_shape, like: torch.Tensor, w_shape, padding, parts: int = 8,
              whole: int | None = None) -> int | None:
    """The rows per slab `input_grad_into_` would use for an output gradient of `dz_shape`
    (dtype and device of `like`) and a weight of `w_shape`, or None where it computes the
    gradient whole; asked without computing anything (`whole`: the backend ATen picks for the
    whole convolution, if the caller has it). On a CPU, slabs only where ATen would run the
    whole on oneDNN: the slabs then run on oneDNN too, called directly
    (`aten.mkldnn_convolution`: ATen's own rule would send thin slabs of few channels to its
    slow kernel), `parts` of them; below that size ATen's slow kernel runs the whole and the
    slabs would save next to nothing. Elsewhere, the most slabs, up to `parts`, on the backend
    ATen picks for the whole."""
    k = tuple(w_shape[2:])
    D = dz_shape[2]
    if (w_shape[0] != w_shape[1] or k[0] % 2 == 0
            or tuple(padding) != tuple((n - 1) // 2 for n in k)):
        return None
    p = padding[0]
    whole = _whole_backend(dz_shape, like, w_shape, padding) if whole is None else whole
    if like.device.type == "cpu":
        rows = -(-D // parts)
        return rows if whole == MKLDNN and rows + p < D else None
    from .recompute import conv_backend
    wt_shape = (w_shape[1], w_shape[0]) + k

    def backend(depth):
        return conv_backend((dz_shape[0], dz_shape[1], depth) + tuple(dz_shape[3:]), like,
                            wt_shape, (1, 1, 1), tuple(padding))
    return next((r for r in sorted({-(-D // n) for n in range(2, parts + 1)})
                 if r + p < D and backend(r + p) == whole), None)


def input_grad_into_(dz: torch.Tensor, w: torch.Tensor, padding, parts: int = 8) -> bool:
    """Overwrites dz (the output gradient of a stride-1, undilated, ungrouped 'same'
    convolution with weight w, as many input as output channels) with the input gradient,
    slab by slab along the first spatial axis: the input gradient of such a convolution is the
    convolution of dz with w transposed and flipped. Each slab reads its rows and the next one
    (still intact) and the row before it from a saved copy (that row is overwritten by then),
    so besides dz only about 1/`parts` of it exists at a time (all channels per slab: each
    slab's convolution runs on the backend the whole one would, see `slab_rows`). Returns
    False, touching nothing, where the shape does not fit or `slab_rows` computes it whole
    (small on a CPU, or no slabs keep the backend); the caller then computes the gradient
    whole."""
    whole = _whole_backend(tuple(dz.shape), dz, tuple(w.shape), padding)
    rows = slab_rows(tuple(dz.shape), dz, tuple(w.shape), padding, parts, whole)
    if rows is None:
        return False
    p = padding[0]
    D = dz.shape[2]
    wt = w.transpose(0, 1).flip(2, 3, 4).contiguous()
    wt_top = wt[:, :, :1].contiguous()
    conv = slab_conv(whole)
    before = None  # the p rows above the slab, as they were before the slab above was written
    for d0 in range(0, D, rows):
        d1 = min(d0 + rows, D)
        e = min(d1 + p, D)
        out = conv(dz[:, :, d0:e], wt, padding)[:, :, :d1 - d0]
        if before is not None:
            # What the p rows above add to the slab's first p rows (the padding read zeros):
            # output row i < p reads them through the kernel's taps 0 .. p - 1 - i; with
            # p = 1, row 0 through tap 0 alone (no zero rows to convolve).
            if p == 1:
                out[:, :, :1] += conv(before, wt_top, (0,) + tuple(padding[1:]))
            else:
                rows_above = torch.cat([before, before.new_zeros(
                    before.shape[:2] + (2 * p,) + before.shape[3:])], 2)
                out[:, :, :p] += conv(rows_above, wt, (0,) + tuple(padding[1:]))
                del rows_above
        before = dz[:, :, d1 - p:d1].clone() if d1 < D else None
        dz[:, :, d0:d1] = out
        del out
    return True
