"""A convolution whose weight gradient is added into the weight's `.grad` a slice at a time.

Autograd computes a convolution's whole weight gradient, hands it to the weight's
AccumulateGrad, which adds it into `.grad` (already allocated from the second training step on)
and frees it. Deep in a U-Net the weights are larger than the activations (MONAI UNet's
512 -> 512 bottom convolution: a 27 MiB weight over 4^3 voxels), so that transient is the
largest tensor of the step, and at the tensor peak of a recomputed network. Here, when it is
safe, backward computes the weight gradient in slices of at most 1/`MAX_SLICES` of the weight
(ATen's convolution backward on a slice of the output gradient, or of the input for a
transposed convolution), adds each into `.grad` at once, and returns no gradient for the
weight: the AccumulateGrad node still runs, so post-accumulate hooks and DDP's hooks see the
full `.grad` exactly when they would have.

Safe means: the weight is a leaf whose `.grad` exists (strided, no grad of its own), this
backward accumulates into it (`.backward()`, not `torch.autograd.grad`, and the weight not left
out by `inputs=`), no graph of the backward is built (`create_graph`), and the weight has no
tensor hook (it would see no gradient). Otherwise the weight gradient is computed whole and
returned, as autograd does. Hooks registered directly on the AccumulateGrad node before it runs
(`register_prehook`) receive None on the safe path.

`part=(start, count)`: the convolution reads only the weight's input channels
`[start, start + count)` (a convolution over one part of a concatenation); its gradient goes to
that slice of `.grad` (on the fallback path, into a zero tensor of the weight's size, as
autograd's slice backward would).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge

from .recompute import conv_backend
from .slabs import MKLDNN_TRANSPOSE, onednn_conv_transpose

# The weight gradient of one convolution is computed in at most this many slices: a slice is
# then at most a quarter of the weight (or the size of the convolution's largest activation,
# where that is more), at the price of as many calls of the weight-gradient kernel, each of
# which unfolds the whole input again on CPU. Measured (Intel Xeon, 2 threads): eight slices
# cost 1.3x (512 -> 512 at 4^3) to 4.6x (64 -> 128, stride 2, at 16^3) one whole weight
# gradient, four 1.0-2.6x. The tensor peak of a converted (recompute=True) training step at
# 64^3 is the same with four as with eight for MONAI UNet, DynUNet (plain and res_block),
# BasicUNet, PlainConvUNet and ResEnc M (the deep levels' backward runs far from the peak), and
# MONAI UNet's step is 3-7% faster.
MAX_SLICES = 4


@dataclass(frozen=True)
class ConvSpec:
    transposed: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    part: tuple[int, int] | None = None  # the weight's input channels read: (start, count)
    # The largest tensor of the network's pass (elements; 0: unknown): slices need not be
    # smaller than twice it (`conv_grads`).
    scale: int = 0

    @staticmethod
    def of(conv: torch.nn.Module, part: tuple[int, int] | None = None,
           scale: int = 0) -> "ConvSpec":
        transposed = bool(getattr(conv, "transposed", False))
        return ConvSpec(transposed, tuple(conv.stride), tuple(conv.padding),
                        tuple(conv.output_padding) if transposed else (0,) * len(conv.stride),
                        tuple(conv.dilation), conv.groups, part, scale)


def _weight_part(w: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    if spec.part is None:
        return w
    start, count = spec.part
    # a convolution's weight is (out, in, *k), a transposed one's (in, out, *k)
    return w.narrow(0 if spec.transposed else 1, start, count)


def _select(x_shape, like: torch.Tensor, w_shape, spec: ConvSpec) -> int:
    return conv_backend(x_shape, like, w_shape, spec.stride, spec.padding, spec.transposed,
                        spec.dilation, spec.output_padding, spec.groups)


def _part_on_onednn(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> bool:
    """Whether a transposed convolution over a part of the input channels (a concatenation
    computed without concatenating) runs on oneDNN directly: on a CPU where ATen runs the whole
    (all input channels) on oneDNN but would send the part, with fewer channels, to its slow
    kernel (its rule counts N*C*D*H), as stock's whole transposed convolution runs. Only
    where autograd does not record (the Function's own forward and backward: the oneDNN calls
    have no derivative of their own) and outside autocast."""
    if not (spec.transposed and spec.part is not None and spec.groups == 1
            and x.device.type == "cpu" and x.dim() == 5 and x.dtype == weight.dtype
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
        return False
    full = (x.shape[0], weight.shape[0]) + tuple(x.shape[2:])
    w_part = (x.shape[1],) + tuple(weight.shape[1:])
    return (_select(full, x, tuple(weight.shape), spec) == MKLDNN_TRANSPOSE
            and _select(tuple(x.shape), x, w_part, spec) != MKLDNN_TRANSPOSE)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() or t.is_contiguous(
        memory_format=torch.channels_last_3d) else t.contiguous()


def conv_forward(x, weight, b, spec: ConvSpec):
    """The convolution of `x` with `weight` (its part `spec.part`) and `b`."""
    w = _weight_part(weight, spec)
    nd = w.dim() - 2
    if _part_on_onednn(x, weight, spec):
        return onednn_conv_transpose(_dense(x), w, b, spec.stride, spec.padding,
                                     spec.output_padding, spec.dilation, spec.groups)
    if spec.transposed:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        return fn(x, w, b, spec.stride, spec.padding, spec.output_padding, spec.groups,
                  spec.dilation)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups)


def _backward(g, x, w, spec: ConvSpec, mask, onednn: bool = False):
    if onednn:
        # The transposed convolution's gradients through its adjoint, a convolution from g:
        # the input gradient is that convolution (on oneDNN, called directly), the weight
        # gradient its weight gradient with x as the output gradient (on the backend ATen picks
        # for an input of g's, the full resolution's, size).
        nd = w.dim() - 2
        dx = torch.ops.aten.mkldnn_convolution(
            _dense(g), w.contiguous(), None, list(spec.padding), list(spec.stride),
            list(spec.dilation), spec.groups) if mask[0] else None
        dw = torch.ops.aten.convolution_backward(
            x, g, w, None, list(spec.stride), list(spec.padding), list(spec.dilation), False,
            [0] * nd, spec.groups, [False, True, False])[1] if mask[1] else None
        db = g.sum([0] + list(range(2, g.dim()))) if mask[2] else None
        return dx, dw, db
    return torch.ops.aten.convolution_backward(
        g, x, w, [w.shape[1] * spec.groups if spec.transposed else w.shape[0]] if mask[2]
        else None, list(spec.stride), list(spec.padding), list(spec.dilation), spec.transposed,
        list(spec.output_padding), spec.groups, list(mask))


def _writable_grad(node) -> torch.Tensor | None:
    """The `.grad` of the weight whose AccumulateGrad is `node`, where this backward may add
    the weight gradient into it directly (module docstring), else None. (The weight itself, not
    the tensor saved for backward: a checkpoint hands back a detached copy, without `.grad`.)"""
    if node is None or torch.is_grad_enabled():
        return None
    w = node.variable
    g = w.grad
    if g is None or g.layout != torch.strided or g.requires_grad or g.shape != w.shape or (
            w._backward_hooks):
        return None
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    try:
        # raises inside torch.autograd.grad, which captures leaf gradients instead
        if will_execute is None or not will_execute(node):
            return None
    except RuntimeError:
        return None
    return g


def conv_grads(g, x, weight, spec: ConvSpec, node, need_x: bool, need_w: bool,
               need_b: bool):
    """The gradients (input, weight, bias) of a convolution of `x` with `weight` (its part
    `spec.part`) for the output gradient `g`. Where it is safe (module docstring; `node`: the
    weight's AccumulateGrad) the weight gradient is added into `.grad` a slice at a time and
    None is returned in its place; otherwise it comes back whole, of the weight's full size.
    A slice is at most the size of the convolution's largest activation, or of twice the
    largest tensor of the network's pass (`spec.scale`) where that is more: where the network
    keeps tensors of that size for backward, a transient of twice it sets no peak (MONAI UNet at
    64^3: two slices of its 512 -> 512 weight instead of four, the same peak, a faster step; at
    32^3 still four), in at most `MAX_SLICES` slices."""
    wp = _weight_part(weight, spec)
    target = _writable_grad(node) if need_w else None
    if target is not None and spec.groups == 1:
        rows = wp.shape[0]
        largest = max(x.numel(), g.numel(), 2 * spec.scale)
        slices = min(rows, MAX_SLICES, max(1, math.ceil(wp.numel() / largest)))
    else:
        target, slices = None, 1
    onednn = _part_on_onednn(x, weight, spec)
    dx, dw, db = _backward(g, x, wp, spec, (need_x, need_w and slices == 1, need_b), onednn)
    if target is None:
        if dw is not None and spec.part is not None:
            full = dw.new_zeros(weight.shape)
            _weight_part(full, spec).copy_(dw)
            dw = full
        return dx, dw, db
    into = _weight_part(target, spec)
    if dw is not None:
        into.add_(dw)
        return dx, None, db
    edges = [rows * i // slices for i in range(slices + 1)]
    for r0, r1 in zip(edges, edges[1:]):
        # rows of the weight: output channels of a convolution (a slice of g), input channels
        # of a transposed one (a slice of x)
        gs, xs = (g, x[:, r0:r1]) if spec.transposed else (g[:, r0:r1], x)
        part = _backward(gs, xs, wp[r0:r1], spec, (False, True, False), onednn)[1]
        into[r0:r1].add_(part)
        del part
    return dx, None, db


class ConvGradIntoFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: ConvSpec, node):
        ctx.spec, ctx.node = spec, node
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv_forward(x, weight, bias, spec)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = conv_grads(g, x, weight, ctx.spec, ctx.node, need_x, need_w,
                                need_b and ctx.has_bias)
        return dx, dw, db, None, None


def accumulate_node(w: torch.Tensor):
    """The AccumulateGrad node of a leaf weight that requires grad, while grad mode is on
    (for `conv_grads`), else None."""
    if torch.is_grad_enabled() and w.requires_grad and w.grad_fn is None:
        return get_gradient_edge(w).node
    return None


def usable(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv` may run `module` on `x`: a stock convolution or transposed convolution
    with zero padding, no hooks, the input in the weight's dtype, outside autocast."""
    return (type(module) in _TYPES and module.padding_mode == "zeros"
            and x.dtype == module.weight.dtype and not torch.is_autocast_enabled(x.device.type)
            and not (module._forward_hooks or module._forward_pre_hooks
                     or module._backward_hooks or module._backward_pre_hooks))


_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
          torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def conv(module: torch.nn.Module, x: torch.Tensor, part: tuple[int, int] | None = None,
         bias: bool = True, scale: int = 0) -> torch.Tensor:
    """`module(x)` for a convolution or transposed convolution, or with `part=(start, count)`
    its convolution over the weight's input channels [start, start + count) (the bias added
    where `bias`; zero padding), with the weight gradient added into `.grad` directly where
    that is safe (module docstring; `scale`: the largest tensor of the network's pass, see
    `conv_grads`). Where `module` is not `usable` on `x` it runs as autograd runs it (the
    module itself, or the functional form on the weight's slice)."""
    w = module.weight
    b = module.bias if bias else None
    spec = ConvSpec.of(module, part, scale)
    if not usable(module, x):
        return module(x) if part is None else conv_forward(x, w, b, spec)
    return ConvGradIntoFunction.apply(x, w, b, spec, accumulate_node(w))


__all__ = ["ConvGradIntoFunction", "ConvSpec", "MAX_SLICES", "accumulate_node", "conv",
           "conv_forward", "conv_grads", "usable"]
