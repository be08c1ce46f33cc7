"""How much less memory a network's training step takes once converted by effseg: measured.

`memory_ratio(network, unit, ...)` runs forward + backward of the stock network and of its
`effseg.convert(network, **options)` twin on CPU in float32, at two input sizes of one sample,
and tracks the bytes held by tensors at every op (`effseg.memory.peak_allocated`, exact and
deterministic). The second size is the first with its first axis doubled (both multiples of
the network's total stride per axis, `unit`), so every feature map of the second is exactly
twice that of the first, and the difference of the two peaks divided by the voxels added is the
bytes per input voxel the step holds at its peak: what grows with the patch. The ratio
effseg / stock of those slopes is what nnU-Net's memory estimate (a count of feature-map
elements, proportional to the voxels) is multiplied by for the effseg network.

The parameters' gradients are allocated before the step and the output gradients are given, so
neither the optimizer nor a loss is measured: the network's own activations are, in both
networks alike. The first size is the smallest multiple of `unit` whose deepest feature map has
two values or more (instance norm needs more than one) and that has at least MIN_VOXELS voxels,
where the peak is linear in the voxels (tested); a measurement takes seconds on CPU.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..convert import convert
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


# Below about this many voxels the gradients of the weights (constant in the size) and the
# per-channel buffers decide which moment of the step is its peak, and the peak stops being
# linear in the voxels (measured: nnU-Net's 4-stage network of 32-256 features gave a ratio of
# 0.673 from 16 x 8 x 8 and 32 x 8 x 8, and 0.580, exactly linear, from 32 x 32 x 32 and
# 64 x 32 x 32).
MIN_VOXELS = 2 ** 15


def _smallest_linear_size(unit: tuple[int, ...]) -> tuple[int, ...]:
    """The first measured size: a multiple of `unit` with the deepest map 2 x 1 x 1 or larger,
    grown (its shortest side doubled) to at least MIN_VOXELS."""
    size = [u * (2 if axis == 0 else 1) for axis, u in enumerate(unit)]
    while math.prod(size) < MIN_VOXELS:
        shortest = min(range(len(size)), key=lambda axis: size[axis])
        size[shortest] *= 2
    return tuple(size)


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
    small = _smallest_linear_size(unit)
    sizes = (small, (2 * small[0],) + small[1:])
    stock = copy.deepcopy(network).float()
    converted, _ = convert(copy.deepcopy(stock), inplace=True, **options)
    stock_peaks = tuple(step_peak(stock, s, in_channels) for s in sizes)
    effseg_peaks = tuple(step_peak(converted, s, in_channels) for s in sizes)
    return MemoryRatio(sizes, stock_peaks, effseg_peaks, options)


__all__ = ["MemoryRatio", "memory_ratio", "step_peak"]
