"""Augmentation of whole volumes on the training device (`python -m effseg train --augment`).

nnU-Net trains with heavy augmentation of patches; effseg applies the same kind of transforms to
the whole volume, on the device the network runs on (a 512^3 case never goes back to the CPU),
and resamples in slabs, so the sampling grid of a whole volume never exists at once.

Each training case of each epoch draws its own transform from (seed, epoch, case index) alone.
A resumed run, or a run split over several processes, therefore draws the same transforms as one
uninterrupted process, and `--resume` stays exact.

The transforms, in the order they are applied, with nnU-Net v2's default probabilities (per
case here, per patch there):
- spatial (`--augment all`): with p 0.2 a rotation, angles uniform in +-30 degrees about each
  axis; with p 0.2 a zoom, factor uniform in [0.7, 1.4] (> 1 magnifies). Rotations and zooms are
  carried out in millimetres about the volume's centre, so anisotropic voxels are not sheared;
  where the spacing of one axis is more than 3 times the finest, rotations are about that axis
  only (in-plane), as nnU-Net does. One resampling applies both: the image trilinear, the label
  map nearest. What comes from outside the volume is air (the image's fill value) with the
  loss's ignore label: nothing is known there.
- mirroring along each of `mirror_axes` with p 0.5. The arrays are in RAS order: axis 0 runs
  from the patient's left to right, so mirroring it turns a left organ into a right one. It is
  off unless asked for (`--mirror-axes`), and `predict` mirrors along the same axes at test time.
- intensity (`--augment intensity` and `all`), on the normalized image: with p 0.1 Gaussian
  noise of variance uniform in [0, 0.1]; with p 0.15 a brightness factor in [0.75, 1.25]; with
  p 0.15 a contrast factor in [0.75, 1.25] about the channel's mean, clipped to its former
  range; with p 0.3 a gamma in [0.7, 1.5] on the channel's range, its mean and standard
  deviation kept.

`Augmentation.draw` returns a `CaseTransform` (plain numbers, cheap); `Augmentation.apply` carries
it out on one case's (C, X, Y, Z) image and (X, Y, Z) label map and returns new tensors.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("off", "intensity", "all")
SLAB_VOXELS = 1 << 22  # voxels per resampled slab: a 48 MiB float32 sampling grid
_STREAM = 0x65666673  # tags effseg's augmentation stream among the run's seeded streams
ANISOTROPY = 3.0


@dataclass(frozen=True)
class CaseTransform:
    """What one case's augmentation does (identity fields are None or empty)."""

    matrix: tuple | None = None  # 3x3, output voxel -> source voxel offsets about the centre
    flips: tuple[int, ...] = ()
    noise_std: float | None = None
    noise_seed: int = 0
    brightness: float | None = None
    contrast: float | None = None
    gamma: float | None = None


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation by angles[k] radians about axis k, applied about axis 0 first."""
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = math.cos(angle)
        r[a, b], r[b, a] = -math.sin(angle), math.sin(angle)
        out = r @ out
    return out


def voxel_matrix(rotation: np.ndarray, zoom: float, spacing: Sequence[float]) -> np.ndarray:
    """The map from output to source voxel offsets (about the centre) of a rotation and a zoom
    made in millimetres on a grid of `spacing`."""
    sp = np.asarray(spacing, dtype=np.float64)
    return np.diag(1.0 / sp) @ (rotation / zoom) @ np.diag(sp)


def resample(volume: torch.Tensor, matrix: np.ndarray, mode: str,
             slab_voxels: int = SLAB_VOXELS) -> torch.Tensor:
    """volume (C, X, Y, Z) float sampled at centre + matrix @ (o - centre) for each output voxel
    o; zero outside the volume. mode: "bilinear" (trilinear in 3D) or "nearest"."""
    C, *shape = volume.shape
    device, dtype = volume.device, volume.dtype
    sizes = torch.tensor(shape, dtype=torch.float64)
    centre = (sizes - 1) / 2
    a = torch.as_tensor(np.asarray(matrix), dtype=torch.float64)
    # Normalized coordinate (align_corners=False): g = (2 * index + 1) / size - 1, folded into
    # one affine map of the output index: g = M o + t.
    m = (2.0 / sizes)[:, None] * a
    t = (2.0 * (centre - a @ centre) + 1.0) / sizes - 1.0
    # grid_sample's last axis lists the coordinates of the input's last dimension first.
    m, t = m.flip(0).to(device, dtype), t.flip(0).to(device, dtype)
    # Each output axis' share of the grid, (n, 3); summed by broadcasting, so only the slab's
    # grid itself is ever as large as the slab.
    parts = [torch.arange(n, device=device, dtype=dtype)[:, None] * m[:, k]
             for k, n in enumerate(shape)]
    yz = parts[1][:, None, :] + (parts[2] + t)[None, :, :]
    out = torch.empty_like(volume)
    rows = max(1, slab_voxels // (shape[1] * shape[2]))
    for x0 in range(0, shape[0], rows):
        x1 = min(shape[0], x0 + rows)
        grid = parts[0][x0:x1, None, None, :] + yz[None]
        out[:, x0:x1] = F.grid_sample(volume[None], grid[None], mode=mode, padding_mode="zeros",
                                      align_corners=False)[0]
    return out


@dataclass(frozen=True)
class Augmentation:
    """The augmentation of a run: which transforms, on a grid of `spacing` (mm per array axis),
    with `fill` (per channel) and `ignore_index` for what comes from outside the volume."""

    spacing: tuple[float, float, float]
    fill: tuple[float, ...]
    ignore_index: int
    mode: str = "all"
    mirror_axes: tuple[int, ...] = ()
    p_rotation: float = 0.2
    max_rotation_deg: float = 30.0
    p_zoom: float = 0.2
    zoom: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"effseg: augmentation mode must be one of {MODES}, got "
                             f"{self.mode!r}")
        check_mirror_axes(self.mirror_axes)
        if len(self.spacing) != 3 or not all(s > 0 for s in self.spacing):
            raise ValueError(f"effseg: augmentation spacing must be 3 positive numbers, got "
                             f"{self.spacing}")

    @property
    def active(self) -> bool:
        return self.mode != "off" or bool(self.mirror_axes)

    def _rotation_axes(self) -> list[int]:
        sp = np.asarray(self.spacing)
        coarse = int(sp.argmax())
        return [coarse] if sp[coarse] > ANISOTROPY * sp.min() else [0, 1, 2]

    def draw(self, seed: int, epoch: int, case: int) -> CaseTransform:
        """Case `case`'s transform in epoch `epoch` of a run seeded `seed`. Every value is drawn
        whether it is used or not, so one choice never shifts the others."""
        rng = np.random.default_rng([_STREAM, seed, epoch, case])
        u = rng.random(6)  # one coin per transform
        limit = math.radians(self.max_rotation_deg)
        angles = rng.uniform(-limit, limit, 3)
        zoom = float(rng.uniform(*self.zoom))
        flips = rng.random(3) < 0.5
        noise = (math.sqrt(rng.uniform(*self.noise_variance)), int(rng.integers(2**62)))
        factors = float(rng.uniform(*self.brightness)), float(rng.uniform(*self.contrast))
        gamma = float(rng.uniform(*self.gamma))

        matrix = None
        if self.mode == "all" and (u[0] < self.p_rotation or u[1] < self.p_zoom):
            keep = np.zeros(3)
            keep[self._rotation_axes()] = 1.0
            rotation = rotation_matrix(angles * keep) if u[0] < self.p_rotation else np.eye(3)
            scale = zoom if u[1] < self.p_zoom else 1.0
            matrix = tuple(map(tuple, voxel_matrix(rotation, scale, self.spacing).tolist()))
        intensity = self.mode in ("intensity", "all")
        return CaseTransform(
            matrix=matrix,
            flips=tuple(a for a in self.mirror_axes if flips[a]),
            noise_std=noise[0] if intensity and u[2] < self.p_noise else None,
            noise_seed=noise[1],
            brightness=factors[0] if intensity and u[3] < self.p_brightness else None,
            contrast=factors[1] if intensity and u[4] < self.p_contrast else None,
            gamma=gamma if intensity and u[5] < self.p_gamma else None)

    def apply(self, image: torch.Tensor, label: torch.Tensor,
              t: CaseTransform) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformed (C, X, Y, Z) float image and (X, Y, Z) label map (new tensors, same
        dtypes; the inputs are not modified)."""
        if image.dim() != 4 or label.shape != image.shape[1:]:
            raise ValueError(f"effseg: augmentation takes a (C, X, Y, Z) image and an (X, Y, Z) "
                             f"label map, got {tuple(image.shape)} and {tuple(label.shape)}")
        if len(self.fill) != image.shape[0]:
            raise ValueError(f"effseg: augmentation has {len(self.fill)} fill value(s) for "
                             f"{image.shape[0]} channel(s)")
        fill = torch.tensor(self.fill, dtype=image.dtype, device=image.device)[:, None, None,
                                                                               None]
        if t.matrix is not None:
            matrix = np.array(t.matrix)
            image = resample(image - fill, matrix, "bilinear").add_(fill)
            # Labels shifted by one: 0 is what grid_sample returns outside the volume. Class
            # ids are exact in float32 (below 2^24), and nearest sampling returns input values.
            moved = resample(label[None].to(torch.float32).add_(1), matrix, "nearest")[0]
            outside = moved == 0
            # (clamped: -1 has no unsigned value; those voxels are set just below)
            label = moved.sub_(1).clamp_(min=0).to(label.dtype)
            label[outside] = self.ignore_index
        if t.flips:
            image = image.flip([a + 1 for a in t.flips])
            label = label.flip(list(t.flips))
        elif t.matrix is None:
            image, label = image.clone(), label.clone()  # the steps below work in place
        if t.noise_std is not None:
            g = torch.Generator(device=image.device)
            g.manual_seed(t.noise_seed)
            image += t.noise_std * torch.randn(image.shape, generator=g, device=image.device,
                                               dtype=image.dtype)
        if t.brightness is not None:
            image *= t.brightness
        dims = (1, 2, 3)
        if t.contrast is not None:
            lo, hi = image.amin(dims, keepdim=True), image.amax(dims, keepdim=True)
            mean = image.mean(dims, keepdim=True)
            image = torch.minimum(torch.maximum((image - mean) * t.contrast + mean, lo), hi)
        if t.gamma is not None:
            mean, std = image.mean(dims, keepdim=True), image.std(dims, keepdim=True)
            lo = image.amin(dims, keepdim=True)
            span = image.amax(dims, keepdim=True) - lo + 1e-7
            image = ((image - lo) / span).pow(t.gamma) * span + lo
            image = (image - image.mean(dims, keepdim=True)) / (
                image.std(dims, keepdim=True) + 1e-7) * std + mean
        return image, label


def check_mirror_axes(axes: Sequence[int]) -> tuple[int, ...]:
    """Mirror axes as a sorted tuple of distinct ints in {0, 1, 2}; ValueError otherwise."""
    axes = tuple(axes)
    if not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 2 for a in axes) \
            or len(set(axes)) != len(axes):
        raise ValueError(f"effseg: mirror axes must be distinct values among 0, 1, 2 (the RAS "
                         f"array axes), got {list(axes)}")
    return tuple(sorted(axes))
