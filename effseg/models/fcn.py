"""FullVolumeFCN: a U-Net for whole volumes built from effseg's recomputing blocks.

Encoder level i: RecomputeBlock3d(channels[i-1] -> channels[i], first conv strided by
strides[i]); decoder level i: DecoderBlock3d (transposed-conv upsampling, concatenation-free
skip fusion, two units); a 1x1x1 head. A training step keeps, per level, little more than the
level's encoder output and the decoder's low-resolution input: every block keeps only its
inputs, and keeps its output only where the next layer keeps it anyway (`keep_output`), which
spares recomputing its second unit.

The step's memory peak is in the backward of the two finest levels, so there the network
trades a little time for it. The full-resolution encoder and decoder blocks are `lean`: the
encoder block writes its gradients into the incoming one (`owns_grad`: the network makes sure
nothing else reads it) and recomputes its units from its input, the second a slab of rows at a
time (under autocast both, as often as each pass needs them, so that the incoming gradient is
its only tensor of the output's size); the decoder level runs as three autograd Functions (skip
fusion, first norm-act and second convolution, second norm-act and the head), so that autograd
releases each gradient it hands over (the logits', then dz2, then dz1) as soon as its Function
is done, writes its norm-act gradients into the tensors they come from and the convolutions'
input gradients over their output gradients, slab by slab. Every decoder level folds its
upsampling into the convolution after it (`effseg.ops.folded_up`: no full-resolution upsampled
tensor, about half the multiply-adds of the two). The encoder blocks below the first run split
(`split=True`: the output's gradient is gone before the input's is born) and pass their input
on as the skip of the level above (`_encode`), so the decoder's gradient for the skip reaches
the block's first convolution, which adds its input gradient into it (slab by slab) rather than
autograd summing the two into a third tensor. The second block does not keep its input, the
finest skip, at all: it recomputes it from the network's input in slabs of rows where it needs
it (`RowsSource`, filled by the first block), so the skip goes as soon as the finest decoder
level is done with it and never meets its own gradient. These last two (the first block's
backward in slabs, the second's recomputed input) only under autocast
(`trades_time_for_memory`: there the peak is in these blocks' backward; in the parameters' own
precision it is in the finest decoder level's, and they would only cost time). Measured
(`effseg.memory.peak_allocated`, second step, 1x1xE^3): 0.198x the stock twin's at 64^3,
96^3 and 128^3 in float32; 0.198x (64^3), 0.194x (96^3) and 0.196x (128^3) in bf16 autocast.

Outputs are dense tensors in the input's memory format (contiguous or channels-last), also when
the padding is cropped off, so `DiceCELoss` and exporters take them as they are. Inside, on a
CPU, the network computes in channels-last layout whatever the input's (`channels_last`): there
oneDNN runs the full-resolution convolutions of few channels about twice as fast as on
contiguous tensors, which it would reorder on every call (2x16x48x48x32, 16 output channels:
6.3 vs 14.7 ms forward, 11.7 vs 21.5 ms backward; `benchmarks/bench_conv_backend.py`, Intel
Xeon, 2 threads, 2026-12-06). A one-channel
input becomes channels-last without a copy; the logits go back to the input's layout in the
crop, a copy of a few channels.

Inputs of any spatial size: padded with zeros to a multiple of the total stride and the output
cropped back, so the output has the input's spatial shape. Constructor names follow MONAI's
UNet/DynUNet.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn.blocks import RecomputeBlock3d, _compute_dtype
from ..nn.conv_norm_act import Spec
from ..nn.decoder import DecoderBlock3d
from ..ops.recompute import RowsSource, trades_time_for_memory
from ._shape import to_channels_last
from ._unet import UNetBase

DEFAULT_CHANNELS = (16, 32, 64, 128, 160)
DEFAULT_STRIDES = (1, 2, 2, 2, 2)


class FullVolumeFCN(UNetBase):
    """U-Net of effseg blocks for whole-volume training.

    Args: spatial_dims (3 only), in_channels, out_channels (classes), channels (per level),
    strides (per level; the first is usually 1; an int or a (d, h, w) triple), kernel_size,
    norm ("batch", "instance" or a (name, kwargs) tuple), act (MONAI-style), recompute (True:
    every block recomputes; False: the same network keeping every unit's output; or one bool per
    level, for the encoder block and the decoder block of that resolution: `effseg plan` picks
    the cheapest setting that fits a memory budget), deep_supervision (training
    returns [full resolution, then each coarser decoder level] logits; eval returns the full
    resolution only), fold_upsampling (recomputing decoder levels fold their upsampling into
    the convolution after it where that costs fewer multiply-adds, `effseg.ops.folded_up`;
    False runs the two convolutions as stock does, at more memory and time), channels_last
    (the layout the network computes in: True channels-last, False the input's, None (default)
    channels-last on a CPU and the input's elsewhere; the output is in the input's layout
    either way).
    """

    fuses_head = True

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = DEFAULT_CHANNELS,
                 strides: Sequence = DEFAULT_STRIDES, kernel_size: int = 3,
                 norm: Spec = "batch", act: Spec = ("leaky_relu", {"negative_slope": 0.01}),
                 recompute: bool | Sequence[bool] = True,
                 deep_supervision: bool = False, fold_upsampling: bool = True,
                 channels_last: bool | None = None) -> None:
        super().__init__("FullVolumeFCN", spatial_dims, in_channels, out_channels, channels,
                         strides, deep_supervision)
        levels = len(self.channels)
        per_level = [bool(recompute)] * levels if isinstance(recompute, bool) else [
            bool(r) for r in recompute]
        if len(per_level) != levels:
            raise ValueError(f"effseg: recompute has {len(per_level)} entries but there are "
                             f"{levels} levels")
        self.recompute = tuple(per_level)
        self.channels_last = channels_last
        self._build(
            lambda ci, co, s, i: RecomputeBlock3d(ci, co, kernel_size, s, norm, act,
                                                  recompute=per_level[i], keep_output=i > 0,
                                                  lean=i == 0, split=i >= 1,
                                                  release_input=i == 1 and per_level[0],
                                                  owns_grad=i == 0),
            lambda low, skip, co, s, i: DecoderBlock3d(low, skip, co, s, kernel_size, norm, act,
                                                       recompute=per_level[i],
                                                       keep_output=i > 0, lean=i == 0,
                                                       fold_upsampling=fold_upsampling))

    def _compute_layout(self, x):
        cl = self.channels_last if self.channels_last is not None else x.device.type == "cpu"
        return to_channels_last(x) if cl else x

    def _encode(self, level, block, h, skips, state):
        # Each split block passes its input on (an alias) as the skip of the level above, so
        # that the decoder's gradient for the skip reaches that block's first convolution,
        # which adds its own input gradient into it: no out-of-place sum by autograd (three
        # tensors of the level's size), and no input gradient beside the input where the
        # block also releases it (`RecomputeBlock3d._forward_passing_input`). The second
        # block recomputes the finest skip from the network's input in its backward, in slabs
        # (`RowsSource`, which the lean first block fills), rather than keep it: the skip
        # goes once the finest decoder level is done with it.
        if level >= 1 and getattr(block, "split", False):
            source = state.pop("rows", None) if block.release_input else None
            h, skips[level - 1] = block._forward_passing_input(h, source=source)
            skips.append(h)
            return h
        if level == 0 and getattr(block, "lean", False) and trades_time_for_memory(
                _compute_dtype(h), block.unit1.conv.weight.dtype):
            state["rows"] = RowsSource()
            h = block(h, source=state["rows"])
            skips.append(h)
            return h
        return super()._encode(level, block, h, skips, state)

    def to_stock(self):
        """The same network (same weights and statistics) built from stock layers."""
        from .stock import StockUNet3d
        ref = next(self.parameters())
        stock = StockUNet3d._like(self).to(device=ref.device, dtype=ref.dtype)
        state = {}
        for key, value in self.state_dict().items():
            if ".conv_skip." in key:
                up_key = key.replace(".conv_skip.", ".conv_up.")
                state[key.replace(".conv_skip.", ".conv.")] = torch.cat(
                    [value, self.state_dict()[up_key]], dim=1)
            elif ".conv_up." not in key:
                state[key] = value
        stock.load_state_dict(state)
        return stock
