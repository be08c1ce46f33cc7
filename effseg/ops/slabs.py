"""Convolutions computed a slab of rows (first spatial axis) at a time.

A stride-1 'same' convolution's output rows [r0, r1) need only the input rows [r0 - p, r1 + p)
(zeros beyond the volume), so a full-resolution tensor that is only needed to make another one
can be produced and consumed a slab at a time, and never exist whole. ATen chooses a backend per
call from the shapes, and its rule for float32 on the CPU sends thin slabs of few channels to its
slow kernel (im2col, with a large hidden buffer) where the whole tensor would run on oneDNN; the
slabs here run on the backend the whole convolution would, calling oneDNN directly
(`aten.mkldnn_convolution`) where that is it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MKLDNN = 8  # int(torch._C._ConvBackend.Mkldnn)
# int(torch._C._ConvBackend.MkldnnTranspose) (unnamed in Python: compare by value)
MKLDNN_TRANSPOSE = 9


def onednn_conv_transpose(x, w, b, stride, padding, output_padding, dilation, groups: int):
    """A transposed convolution on oneDNN, called directly (where ATen's own rule would send it
    to another backend, or where ATen's route would make extra copies). It has no derivative:
    only where autograd does not record."""
    return torch.ops.mkldnn._convolution_transpose_pointwise(
        x, w.contiguous(), b, list(padding), list(output_padding), list(stride), list(dilation),
        groups, "none", [], None)


def slab_conv(whole_backend: int):
    """conv(t, w, padding): F.conv3d (stride 1, undilated, ungrouped) on the backend
    `whole_backend` (a `conv_backend` value) where that is oneDNN, else as ATen chooses."""
    if whole_backend == MKLDNN:
        def conv(t, w, padding):
            return torch.ops.aten.mkldnn_convolution(t, w, None, list(padding), [1, 1, 1],
                                                     [1, 1, 1], 1)
    else:
        def conv(t, w, padding):
            return F.conv3d(t, w, None, 1, tuple(padding))
    return conv


def same_rows(w_shape, stride, padding, dilation, groups) -> bool:
    """Whether a convolution is one `conv_rows` computes: stride 1, undilated, ungrouped, an
    odd kernel with 'same' padding along the first spatial axis."""
    k = w_shape[2]
    return (tuple(stride) == (1, 1, 1) and tuple(dilation) == (1, 1, 1) and groups == 1
            and k % 2 == 1 and padding[0] == (k - 1) // 2)


def conv_rows(conv, t: torch.Tensor, t0: int, depth: int, r0: int, r1: int, w: torch.Tensor,
              padding) -> torch.Tensor:
    """Output rows [r0, r1) of conv(input, w) (stride 1, 'same' along the first spatial axis),
    where `t` holds the input's rows [t0, t0 + t.shape[2]) of `depth` (zeros beyond), at least
    those the output rows need; `conv` as `slab_conv` gives it."""
    p = padding[0]
    a, b = max(r0 - p, 0), min(r1 + p, depth)
    sub = t[:, :, a - t0:b - t0]
    top, bottom = a - (r0 - p), (r1 + p) - b
    if top or bottom:
        sub = F.pad(sub, (0, 0, 0, 0, top, bottom))
    return conv(sub, w, (0,) + tuple(padding[1:]))
