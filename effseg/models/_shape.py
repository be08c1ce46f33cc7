"""Whole volumes of any size through a network whose levels downsample: pad the input to a
multiple of the total stride, crop the output back."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..ops.recompute import _layout, dense_strides


def as_strides(strides: Sequence, levels: int) -> list[tuple[int, int, int]]:
    """Per-level strides as (d, h, w) triples; an int means the same on every axis."""
    if len(strides) != levels:
        raise ValueError(f"effseg: strides has {len(strides)} entries but channels has {levels}")
    out = []
    for s in strides:
        t = tuple(s) if isinstance(s, (tuple, list)) else (s, s, s)
        if len(t) != 3 or not all(isinstance(v, int) and v >= 1 for v in t):
            raise ValueError(f"effseg: a stride must be a positive int or 3 of them, got {s!r}")
        out.append(t)
    return out


def total_stride(strides: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    return tuple(math.prod(s[a] for s in strides) for a in range(3))


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> tuple[torch.Tensor, tuple]:
    """Zero-pads the spatial end of each axis up to a multiple; returns the padded input and the
    original spatial shape."""
    shape = tuple(x.shape[2:])
    extra = [(-n) % m for n, m in zip(shape, multiple)]
    if any(extra):
        # F.pad lists the last axis first
        x = F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]))
    return x, shape


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format a network's output takes from its input: channels-last for a
    channels-last input, contiguous otherwise. With one channel both formats can hold at once;
    the channel stride tells them apart (1 in channels-last)."""
    return _layout(x)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, D, H, W) in channels-last layout, with the strides of a dense channels-last
    tensor (for one channel a view of the same memory: the channel stride tells the layout,
    see `output_format`)."""
    strides = dense_strides(x.shape, torch.channels_last_3d)
    if x.stride() == strides:
        return x
    if not x.is_contiguous(memory_format=torch.channels_last_3d):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x if x.stride() == strides else x.as_strided(x.shape, strides)


def crop(y: torch.Tensor, shape: Sequence[int], factor: Sequence[int] = (1, 1, 1),
         memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The part of `y` (on a grid `factor` times coarser than the input) covering `shape`, as a
    dense tensor in `memory_format`: a copy only where padding is cut off or the layout differs
    (the padded `y` dies with the copy, so the copy adds no memory after the call), so that
    consumers that read dense layouts (the fused loss, exporters) get one."""
    d, h, w = (math.ceil(n / f) for n, f in zip(shape, factor))
    return y[:, :, :d, :h, :w].contiguous(memory_format=memory_format)
