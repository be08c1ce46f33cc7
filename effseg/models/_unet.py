"""What FullVolumeFCN and StockUNet3d share: the U-Net's levels, heads and traversal. Subclasses
supply the encoder and decoder blocks; the traversal (pad to the total stride, encode, decode with
skips, heads, crop back) is written once."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._shape import as_strides, crop, output_format, pad_to_multiple, total_stride


class UNetBase(nn.Module):
    # Whether the finest decoder block takes the head (`block(low, skip, head=...)`).
    fuses_head = False

    def __init__(self, name: str, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int], strides: Sequence, deep_supervision: bool) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"effseg: {name} is 3D only, got spatial_dims={spatial_dims}")
        if len(channels) < 2:
            raise ValueError(f"effseg: {name} needs at least 2 levels (channels)")
        self._name = name
        self.in_channels, self.out_channels = in_channels, out_channels
        self.channels = tuple(channels)
        self.strides = as_strides(strides, len(channels))
        self.total_stride = total_stride(self.strides)
        self.deep_supervision = deep_supervision

    def _build(self, encoder: Callable[[int, int, tuple, int], nn.Module],
               decoder: Callable[[int, int, int, tuple, int], nn.Module]) -> None:
        """encoder(cin, cout, stride, level); decoder(low, skip, cout, up_stride, level)."""
        cins = (self.in_channels,) + self.channels[:-1]
        self.encoder = nn.ModuleList(
            encoder(ci, co, s, i)
            for i, (ci, co, s) in enumerate(zip(cins, self.channels, self.strides)))
        self.decoder = nn.ModuleList(
            decoder(self.channels[i + 1], self.channels[i], self.channels[i],
                    self.strides[i + 1], i)
            for i in reversed(range(len(self.channels) - 1)))
        self.head = nn.Conv3d(self.channels[0], self.out_channels, 1)
        self.ds_heads = nn.ModuleList(
            nn.Conv3d(self.channels[i], self.out_channels, 1)
            for i in reversed(range(1, len(self.channels) - 1))
        ) if self.deep_supervision else None

    def output_strides(self) -> list[tuple[int, int, int]]:
        """The grid step (in input voxels, per axis) of each output of a training-mode forward,
        finest first: [(1, 1, 1)] without deep supervision, one more coarser level per
        deep-supervision head with it (what `DeepSupervisionLoss` takes)."""
        out = [(1, 1, 1)]
        if self.deep_supervision:
            out += [total_stride(self.strides[: level + 1])
                    for level in range(1, len(self.channels) - 1)]
        return out

    def _compute_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The (padded) input in the layout the network computes in: as given, unless a
        subclass says otherwise. The output takes the input's layout either way."""
        return x

    def _encode(self, level: int, block: nn.Module, h: torch.Tensor, skips: list,
                state: dict) -> torch.Tensor:
        """Runs encoder block `level` on `h`, appends its output to `skips` (the skip of its
        level) and returns it. Subclasses may also replace earlier skips and pass things from
        one level to the next in `state` (one dict per forward; see FullVolumeFCN)."""
        h = block(h)
        skips.append(h)
        return h

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"effseg: {self._name} expects (N, C, D, H, W), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"effseg: {self._name} expects {self.in_channels} input channels, "
                             f"got {x.shape[1]}")
        fmt = output_format(x)
        x, shape = pad_to_multiple(x, self.total_stride)
        x = self._compute_layout(x)
        skips, state = [], {}
        h = x
        for i, block in enumerate(self.encoder):
            h = self._encode(i, block, h, skips, state)
        del state
        coarse = []
        last = len(self.decoder) - 1
        for i, block in enumerate(self.decoder[:-1]):
            h = block(h, skips[-2 - i])
            if self.ds_heads is not None and i < len(self.ds_heads):
                coarse.append(h)
        if self.fuses_head:
            logits = self.decoder[last](h, skips[-2 - last], head=self.head)
        else:
            logits = self.head(self.decoder[last](h, skips[-2 - last]))
        out = crop(logits, shape, memory_format=fmt)
        if not (self.deep_supervision and self.training):
            return out
        outs = [out]
        # decoder step i produced level L-2-i; return the finest first
        for i in reversed(range(len(coarse))):
            level = len(self.channels) - 2 - i
            factor = total_stride(self.strides[: level + 1])
            outs.append(crop(self.ds_heads[i](coarse[i]), shape, factor, memory_format=fmt))
        return outs
