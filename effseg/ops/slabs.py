"""Convolutions computed a slab of rows (first spatial axis) at a time.

A stride-1 'same' convolution's output rows [r0, r1) need only the input rows [r0 - p, r1 + p)
(zeros beyond the volume), so a full-resolution tensor that is only needed to make another one
can be produced and consumed a slab at a time, and never exist whole. ATen chooses a backend per
call from the shapes, and its rule for float32 on the CPU sends thin slabs of few channels to its
slow kernel (im2col, with a large hidden buffer) where the whole tensor would run on oneDNN; the
slabs here run on the backend the whole convolution would, calling oneDNN directly
(`aten.mkldnn_convolution`) where that is it.

The same rule sends single float32 samples whose N*C*D*H is at most 20480 (a 1-channel input
below 144^2 per slice; 16 channels below 36^2; the coarse levels of a U-Net) to that slow kernel
as a whole, where oneDNN's forward is 1.1 to 8 times faster (`benchmarks/bench_conv_backend.py`,
Intel Xeon, 2 threads, 2026-12-06). effseg's own convolutions run there on oneDNN
(`runs_on_onednn`); the weight gradient stays with ATen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MKLDNN = 8  # int(torch._C._ConvBackend.Mkldnn)
# int(torch._C._ConvBackend.MkldnnTranspose) (unnamed in Python: compare by value)
MKLDNN_TRANSPOSE = 9
SLOW3D = 14  # int(torch._C._ConvBackend.Slow3d)


def runs_on_onednn(backend: int, like: torch.Tensor) -> bool:
    """Whether effseg runs a convolution for which ATen picks `backend` (a `conv_backend` value)
    on oneDNN: where ATen does, and where ATen picks its slow 3-D kernel for a float32 CPU input
    (see the module docstring) and oneDNN is built in."""
    return backend == MKLDNN or (
        backend == SLOW3D and like.device.type == "cpu" and like.dtype == torch.float32
        and torch.backends.mkldnn.is_available())


def onednn_conv(x, w, stride, padding, dilation, groups: int):
    """A convolution (no bias) on oneDNN, called directly; no derivative (only where autograd
    does not record). Its output takes the input's layout."""
    return torch.ops.aten.mkldnn_convolution(x, w, None, list(padding), list(stride),
                                             list(dilation), groups)


def onednn_conv_transpose(x, w, b, stride, padding, output_padding, dilation, groups: int):
    """A transposed convolution on oneDNN, called directly (where ATen's own rule would send it
    to another backend, or where ATen's route would make extra copies). It has no derivative:
    only where autograd does not record."""
    return torch.ops.mkldnn._convolution_transpose_pointwise(
        x, w.contiguous(), b, list(padding), list(output_padding), list(stride), list(dilation),
        groups, "none", [], None)


def slab_conv(whole_backend: int):
    """conv(t, w, padding, stride=1): F.conv3d (undilated, ungrouped) on oneDNN where the whole
    convolution runs there (`runs_on_onednn` of `whole_backend`, a `conv_backend` value), else
    as ATen chooses."""
    def conv(t, w, padding, stride=(1, 1, 1)):
        if runs_on_onednn(whole_backend, t):
            return onednn_conv(t, w, stride, padding, (1, 1, 1), 1)
        return F.conv3d(t, w, None, tuple(stride), tuple(padding))
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
