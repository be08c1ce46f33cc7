"""How much less memory a network's training step takes once converted by effseg: measured.

`memory_ratio(network, unit, ...)` runs forward + backward of the stock network and of its
`effseg.convert(network, **options)` twin on CPU in float32, at two input sizes of one sample,
and tracks the bytes held by tensors at every op (`effseg.memory.peak_allocated`, exact and
deterministic). With sizes `unit * (2, 1, 1)` and `unit * (4, 1, 1)` (`unit`: the network's total
stride per axis) every feature map of the second is exactly twice that of the first, so the
difference of the two peaks divided by the voxels added is the bytes per input voxel the step
holds at its peak: what grows with the patch. The ratio effseg / stock of those slopes is what
nnU-Net's memory estimate (a count of feature-map elements, proportional to the voxels) is
multiplied by for the effseg network.

The parameters' gradients are allocated before the step and the output gradients are given, so
neither the optimizer nor a loss is measured: the network's own activations are, in both
networks alike. Sizes are as small as the network allows (its deepest feature map 2 x 1 x 1:
instance norm needs more than one value), so a measurement takes seconds on CPU.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ...convert import convert
from ...memory import peak_allocated


@dataclass(frozen=True)
class MemoryRatio:
    """Peaks of one training step of the stock and the converted network at two sizes."""

    sizes: tuple[tuple[int, ...], tuple[int, ...]]
    stock_peaks: tuple[int, int]
    effseg_peaks: tuple[int, int]
    convert_options: dict

    def _slope(self, peaks: tuple[int, int]) -> float:
        added = math.prod(self.sizes[1]) - math.prod(self.sizes[0])
        return (peaks[1] - peaks[0]) / added

    @property
    def stock_bytes_per_voxel(self) -> float:
        return self._slope(self.stock_peaks)

    @property
    def effseg_bytes_per_voxel(self) -> float:
        return self._slope(self.effseg_peaks)

    @property
    def ratio(self) -> float:
        """effseg's bytes per voxel over stock's: below 1 when effseg saves memory."""
        return self.effseg_bytes_per_voxel / self.stock_bytes_per_voxel

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "stock_bytes_per_voxel": self.stock_bytes_per_voxel,
                "effseg_bytes_per_voxel": self.effseg_bytes_per_voxel,
                "sizes": [list(s) for s in self.sizes], "stock_peaks": list(self.stock_peaks),
                "effseg_peaks": list(self.effseg_peaks),
                "convert_options": dict(self.convert_options)}


def step_peak(network: nn.Module, size: Sequence[int], in_channels: int) -> int:
    """Peak bytes held by the tensors of one forward + backward of `network` (train mode) on a
    float32 input (1, in_channels, *size), parameters' gradients allocated beforehand."""
    x = torch.randn(1, in_channels, *size)
    network.train()
    with torch.no_grad():
        out = network(x)
    grads = [torch.randn_like(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
    del out
    for p in network.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None

    def step():
        out = network(x)
        torch.autograd.backward(list(out) if isinstance(out, (list, tuple)) else [out], grads)

    peak = peak_allocated(step)
    network.zero_grad(set_to_none=True)
    return peak


def memory_ratio(network: nn.Module, unit: Sequence[int], in_channels: int,
                 convert_options: dict | None = None) -> MemoryRatio:
    """Measures `network` (stock, left unchanged) against `effseg.convert(network,
    **convert_options)`; `unit` is the network's total stride per spatial axis (the input must
    be a multiple of it)."""
    if not isinstance(network, nn.Module):
        raise TypeError(f"memory_ratio: network must be an nn.Module, got {type(network).__name__}")
    unit = tuple(int(u) for u in unit)
    if not unit or any(u < 1 for u in unit):
        raise ValueError(f"memory_ratio: unit must be positive strides per axis, got {unit}")
    options = dict(convert_options or {})
    sizes = tuple(tuple(u * (k if axis == 0 else 1) for axis, u in enumerate(unit))
                  for k in (2, 4))
    stock = copy.deepcopy(network).float()
    converted, _ = convert(copy.deepcopy(stock), inplace=True, **options)
    stock_peaks = tuple(step_peak(stock, s, in_channels) for s in sizes)
    effseg_peaks = tuple(step_peak(converted, s, in_channels) for s in sizes)
    return MemoryRatio(sizes, stock_peaks, effseg_peaks, options)


__all__ = ["MemoryRatio", "memory_ratio", "step_peak"]
