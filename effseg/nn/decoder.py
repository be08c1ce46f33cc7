"""The U-Net decoder level: upsample, fuse the skip connection without concatenating, two
Conv -> norm-act units.

    up  = ConvTranspose3d(low)                       (kernel = stride = up_stride, no bias)
    out = unit2(norm_act(conv_skip(skip) + conv_up(up)))

`conv_skip(skip) + conv_up(up)` is exactly `conv(cat(skip, up))` with the concatenating conv's
weight split along its input channels (`concat_weight()` gives that weight back), but the
concatenated tensor never exists. With `recompute=True` a training step keeps only `low`, `skip`
and O(C) statistics (`effseg.ops.recompute_decoder`). `lean=True` (for the level at the step's
memory peak) writes the backward's norm-act gradients into the recomputed pre-activations and
the second convolution's input gradient over its output gradient (slab by slab); with a fused
head the level also runs as three Functions (see `effseg.ops.recompute_decoder.decoder_block`):
at most three tensors of the level's size at once, skip included. `fold_upsampling` (default)
computes the upsampling and `conv_up` as one transposed convolution of `low` where that costs
fewer multiply-adds (`effseg.ops.folded_up`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.recompute_decoder import DecoderSpec, decoder_block
from .blocks import _compute_dtype, _triple, unit_spec
from .conv_norm_act import ConvNormAct3d, Spec, parse_act, parse_norm


class DecoderBlock3d(nn.Module):
    def __init__(self, low_channels: int, skip_channels: int, out_channels: int,
                 up_stride=2, kernel_size: int = 3, norm: Spec = "batch",
                 act: Spec = ("leaky_relu", {"negative_slope": 0.01}), recompute: bool = True,
                 keep_output: bool = False, lean: bool = False,
                 fold_upsampling: bool = True) -> None:
        super().__init__()
        self.up_stride = _triple(up_stride)
        self.up = nn.ConvTranspose3d(low_channels, out_channels, self.up_stride, self.up_stride,
                                     bias=False)
        pad = (kernel_size - 1) // 2
        self.conv_skip = nn.Conv3d(skip_channels, out_channels, kernel_size, padding=pad,
                                   bias=False)
        self.conv_up = nn.Conv3d(out_channels, out_channels, kernel_size, padding=pad,
                                 bias=False)
        self.act_name, param = parse_act(act)
        norm_cls, norm_kwargs = parse_norm(norm)
        fused = "identity" if self.act_name == "relu" else self.act_name
        self.norm1 = norm_cls(out_channels, activation=fused, activation_param=param,
                              **norm_kwargs)
        self.unit2 = ConvNormAct3d(out_channels, out_channels, kernel_size, 1, norm, act)
        self.recompute = recompute
        self.keep_output = keep_output
        self.lean = lean
        self.fold_upsampling = fold_upsampling

    def concat_weight(self) -> torch.Tensor:
        """The weight of the equivalent conv over cat(skip, up) (skip channels first)."""
        return torch.cat([self.conv_skip.weight, self.conv_up.weight], dim=1)

    def _check(self, low: torch.Tensor, skip: torch.Tensor) -> None:
        for name, t, c in (("low", low, self.up.in_channels),
                           ("skip", skip, self.conv_skip.in_channels)):
            if not isinstance(t, torch.Tensor) or t.dim() != 5:
                raise ValueError(f"effseg: DecoderBlock3d expects a 5-D {name} input, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            if not t.is_floating_point():
                raise TypeError(f"effseg: DecoderBlock3d {name} must be floating point, got "
                                f"{t.dtype}")
            if t.shape[1] != c:
                raise ValueError(f"effseg: DecoderBlock3d expects {c} {name} channels, got "
                                 f"{t.shape[1]}")
        want = tuple(s * f for s, f in zip(low.shape[2:], self.up_stride))
        if tuple(skip.shape[2:]) != want:
            raise ValueError(f"effseg: DecoderBlock3d: skip has spatial shape "
                             f"{tuple(skip.shape[2:])} but upsampling low gives {want}; pad the "
                             "network input to a multiple of the total stride")

    def _check_head(self, head) -> None:
        if not isinstance(head, nn.Conv3d) or head.in_channels != self.out_channels or (
                _triple(head.kernel_size) != (1, 1, 1) or _triple(head.stride) != (1, 1, 1)
                or _triple(head.padding) != (0, 0, 0) or head.groups != 1):
            raise ValueError(f"effseg: DecoderBlock3d head must be a 1x1x1 nn.Conv3d with "
                             f"{self.out_channels} input channels (stride 1, no padding, one "
                             f"group), got {head!r}")

    @property
    def out_channels(self) -> int:
        return self.unit2.conv.out_channels

    def forward(self, low: torch.Tensor, skip: torch.Tensor,
                head: nn.Conv3d | None = None) -> torch.Tensor:
        """The level's output, or `head(output)` when a 1x1x1 `head` is given (recomputing:
        fused into the block's backward, see DecoderBlockFunction; the output is then never
        kept)."""
        self._check(low, skip)
        if head is not None:
            self._check_head(head)
        params = [p for p in self.parameters() if p.requires_grad]
        if head is not None:
            params += [p for p in head.parameters() if p.requires_grad]
        grad = torch.is_grad_enabled() and (low.requires_grad or skip.requires_grad or params)
        grad = grad and not torch.compiler.is_exporting()  # export records the plain units
        if not (self.recompute and grad):
            z = self.conv_skip(skip) + self.conv_up(self.up(low).to(skip.dtype))
            h = self.norm1(z)
            if self.act_name == "relu":
                h = torch.relu(h)
            out = self.unit2(h)
            return out if head is None else head(out)
        conv = self.conv_skip
        unit1 = unit_spec(self.norm1, conv, self.act_name)
        unit2 = unit_spec(self.unit2.norm, self.unit2.conv, self.unit2.act_name)
        spec = DecoderSpec(self.up_stride, (unit1, unit2), _compute_dtype(skip),
                           self.keep_output, self.lean, self.fold_upsampling)
        return decoder_block(
            low, skip, spec, self.up.weight, self.conv_skip.weight, self.conv_up.weight,
            self.norm1.weight, self.norm1.bias, self.unit2.conv.weight, self.unit2.norm.weight,
            self.unit2.norm.bias, None if head is None else head.weight,
            None if head is None else head.bias)

    def extra_repr(self) -> str:
        return (f"recompute={self.recompute}, keep_output={self.keep_output}, lean={self.lean}, "
                f"fold_upsampling={self.fold_upsampling}")
