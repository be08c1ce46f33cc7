"""The recomputing 3D conv block: two ConvNormAct3d units, optionally residual, that keep only
their input for backward.

With `recompute=True` (the default) a training step stores the block input and O(C) batch
statistics per unit; backward recomputes the inside by replaying those statistics (see
`effseg.ops.recompute`). Running statistics are updated once, in forward. With gradients off
(`torch.no_grad()`, inference) the block runs its units directly: no recompute machinery.
With `recompute=False` it is an ordinary stack of ConvNormAct3d units (in-place norms: each
unit keeps its output).

`keep_output=True` also keeps the block's output, so backward recomputes only the first unit
(about one convolution less per block). That costs no memory where the consumer of the output
keeps it anyway (another block, a convolution, a concatenation), which is the usual case inside
a network; it has no effect with `residual` or act="relu" (the output does not determine the
second unit's pre-activation there).

`split=True` runs the block as two autograd Functions, its first convolution and the rest
(`effseg.ops.recompute_split`): the same numbers and work, but the gradient of the output and
the block's own tensors are released before the gradient of its input is born. For a block
whose first convolution is strided, where the input and its gradient are the largest tensors
of its backward. No effect with `residual` or act="relu". With `release_input=True` as well,
the first convolution's backward lets the block's input go once it has the weight's gradient,
before the input's gradient is born (where nobody else holds the input by then, a network's
second block: see `effseg.ops.recompute_split`); that block's backward then runs only once.
FullVolumeFCN also routes the skip of the level above through each split block
(`_forward_passing_input`), so the decoder's gradient for the skip and the block's input
gradient are summed in one tensor.

`lean=True` (without `keep_output`) makes backward hold at most two tensors of the output's size
besides the incoming gradient, for two more computations of the first unit: for a block whose
first unit is cheap (a network's first block, with one or a few input channels) at the step's
memory peak. No effect with `residual` or act="relu". With `owns_grad=True` as well (only where
the network makes sure that the gradient reaching the block's output is a fresh tensor that
nothing else reads, as FullVolumeFCN does for its first block), that backward writes its
gradients into the incoming one and computes the second unit a slab at a time: one tensor of
the output's size besides the incoming gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.recompute import BlockSpec, RecomputeBlockFunction, RowsSource, Unit
from ..ops.recompute_split import split_block, splits
from .conv_norm_act import ConvNormAct3d, Spec


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def unit_spec(norm, conv: nn.Conv3d, act_name: str) -> Unit:
    """How a recomputing Function runs one conv -> norm -> act unit (counts one norm call)."""
    s = norm.step()
    return Unit(_triple(conv.stride), _triple(conv.padding), _triple(conv.dilation), conv.groups,
                s.per_sample, s.use_batch_stats, s.running_mean, s.running_var, s.momentum,
                s.eps, act_name, norm.activation_param, s.sync)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RecomputeBlock3d(nn.Module):
    """ConvNormAct3d(in -> out, stride) -> ConvNormAct3d(out -> out), plus `x` (or a 1x1x1
    strided projection of it when the shape changes) when `residual`.

    Args: in_channels, out_channels, kernel_size, stride (of the first unit), norm and act
    (MONAI-style specs, see ConvNormAct3d; act="relu" is exact here), residual, recompute.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, norm: Spec = "batch",
                 act: Spec = ("leaky_relu", {"negative_slope": 0.01}), residual: bool = False,
                 recompute: bool = True, keep_output: bool = False, lean: bool = False,
                 split: bool = False, release_input: bool = False,
                 owns_grad: bool = False) -> None:
        super().__init__()
        self.unit1 = ConvNormAct3d(in_channels, out_channels, kernel_size, stride, norm, act)
        self.unit2 = ConvNormAct3d(out_channels, out_channels, kernel_size, 1, norm, act)
        self.residual = residual
        self.recompute = recompute
        self.keep_output = keep_output
        self.lean = lean
        self.split = split
        self.release_input = release_input
        self.owns_grad = owns_grad
        self.skip = None
        if residual and (in_channels != out_channels or _triple(stride) != (1, 1, 1)):
            self.skip = nn.Conv3d(in_channels, out_channels, 1, stride, bias=False)

    @property
    def in_channels(self) -> int:
        return self.unit1.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.unit2.conv.out_channels

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"effseg: RecomputeBlock3d expects a 5-D input (N, C, D, H, W), "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        if not x.is_floating_point():
            raise TypeError(f"effseg: RecomputeBlock3d expects a floating-point input, got "
                            f"{x.dtype}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"effseg: RecomputeBlock3d expects {self.in_channels} input "
                             f"channels, got {x.shape[1]} (shape {tuple(x.shape)})")

    def _spec(self, x: torch.Tensor) -> BlockSpec | None:
        """The recomputing Function's spec, or None where the block runs its units directly.
        Counts one call of each norm (running statistics): once per forward."""
        params = [p for p in self.parameters() if p.requires_grad]
        # Exporting records the plain units (stock ops, see InPlaceABN), never the Function.
        if not (self.recompute and torch.is_grad_enabled() and not torch.compiler.is_exporting()
                and (x.requires_grad or params)):
            return None
        return BlockSpec((unit_spec(self.unit1.norm, self.unit1.conv, self.unit1.act_name),
                          unit_spec(self.unit2.norm, self.unit2.conv, self.unit2.act_name)),
                         self.residual,
                         _triple(self.skip.stride) if self.skip is not None else (1, 1, 1),
                         _compute_dtype(x), self.keep_output, self.lean, self.owns_grad)

    def forward(self, x: torch.Tensor, source: RowsSource | None = None) -> torch.Tensor:
        """`source`: a fresh `effseg.ops.recompute.RowsSource` that a lean block fills, so that
        the split block after it (`_forward_passing_input(..., source=)`) recomputes this
        block's output in its backward instead of keeping it (FullVolumeFCN's first two
        levels)."""
        self._check(x)
        return self._run(x, self._spec(x), source)

    def _run(self, x: torch.Tensor, spec: BlockSpec | None,
             source: RowsSource | None = None) -> torch.Tensor:
        if spec is None:
            out = self.unit2(self.unit1(x))
            if self.residual:
                out = out + (x if self.skip is None else self.skip(x)).to(out.dtype)
            return out
        n1, n2 = self.unit1.norm, self.unit2.norm
        if self.split and splits(spec):
            return split_block(x, spec, self.unit1.conv.weight, n1.weight, n1.bias,
                               self.unit2.conv.weight, n2.weight, n2.bias, self.release_input)
        return RecomputeBlockFunction.apply(
            x, spec, self.unit1.conv.weight, n1.weight, n1.bias, self.unit2.conv.weight,
            n2.weight, n2.bias, None if self.skip is None else self.skip.weight, source)

    def _forward_passing_input(self, x: torch.Tensor, source: RowsSource | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, x'), x' equal to x for one consumer beside this block (FullVolumeFCN's
        decoder level above, its skip). Where the block runs split, x' is an alias that its
        first convolution returns, so the consumer's gradient for x reaches that convolution's
        backward, which adds its own input gradient into it in place: the consumer's backward
        must make that gradient a fresh tensor nothing else reads, as effseg's decoder blocks
        do (see `split_block`). Elsewhere x' is x. `source`: the block below's `RowsSource`,
        where it filled one (see `split_block`)."""
        self._check(x)
        spec = self._spec(x)
        if spec is None or not (self.split and splits(spec)):
            return self._run(x, spec), x
        n1, n2 = self.unit1.norm, self.unit2.norm
        return split_block(x, spec, self.unit1.conv.weight, n1.weight, n1.bias,
                           self.unit2.conv.weight, n2.weight, n2.bias, self.release_input,
                           pass_input=True, source=source)

    def extra_repr(self) -> str:
        return (f"residual={self.residual}, recompute={self.recompute}, "
                f"keep_output={self.keep_output}, lean={self.lean}, split={self.split}"
                + (", release_input=True" if self.release_input else "")
                + (", owns_grad=True" if self.owns_grad else ""))
