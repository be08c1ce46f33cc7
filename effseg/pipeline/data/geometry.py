"""Voxel grids: canonical orientation, resampling to a target spacing, padding to a stride.

Every function acts on the last three axes of an array, so a (X, Y, Z) label map and a
(C, X, Y, Z) image or probability map go through the same calls. Each step returns what is needed
to undo it, so a prediction made on the network's grid returns to the source grid:

- `Reorientation`: permutes and flips axes to RAS (nibabel's closest canonical orientation). It
  moves no voxel off the grid, so `undo(apply(a))` is `a` exactly, and the source affine and shape
  are kept for writing the prediction.
- `resample`: trilinear for intensities and probabilities, nearest for label maps, through
  `torch.nn.functional.interpolate` with voxel-centre alignment (`align_corners=False`,
  `nearest-exact`): the field of view is kept, and `resampled_affine` gives the new grid's affine.
  Resampling back to the source shape restores the shape exactly; values are restored up to the
  interpolation (exactly for labels when one grid is an integer multiple of the other).
- `Padding`: centres a volume in a shape that is a multiple of the network's total stride;
  `crop` removes exactly what was added.

Refused: arrays with fewer than three axes, non-positive spacings or strides, label maps with
negative or non-integer values (a label map must be resampled as such, never linearly).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from .nifti import voxel_spacing

CANONICAL = ("R", "A", "S")


def _check_spatial(array: np.ndarray, what: str) -> None:
    if array.ndim < 3:
        raise ValueError(f"{what} must have at least 3 (spatial) axes, got shape {array.shape}")


def _triple(value: float | Sequence[float], what: str) -> tuple[float, float, float]:
    values = (value,) * 3 if np.isscalar(value) else tuple(value)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{what} must be one positive number or three, got {value!r}")
    return tuple(float(v) for v in values)


def _orient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    lead = array.ndim - 3
    spatial_first = np.moveaxis(array, tuple(range(lead)), tuple(range(3, 3 + lead)))
    moved = orientations.apply_orientation(spatial_first, ornt)
    return np.ascontiguousarray(np.moveaxis(moved, tuple(range(3, 3 + lead)), tuple(range(lead))))


@dataclass(frozen=True, eq=False)
class Reorientation:
    """How a source grid maps onto RAS, and back."""

    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    canonical_shape: tuple[int, int, int]
    to_canonical: np.ndarray
    from_canonical: np.ndarray

    @classmethod
    def of(cls, affine: np.ndarray, shape: Sequence[int]) -> Reorientation:
        """The reorientation of a grid with this `affine` and spatial `shape`."""
        shape = tuple(int(n) for n in shape[:3])
        source = orientations.io_orientation(affine)
        target = orientations.axcodes2ornt(CANONICAL)
        forward = orientations.ornt_transform(source, target)
        canonical_affine = affine @ orientations.inv_ornt_aff(forward, shape)
        canonical_shape = tuple(shape[int(i)] for i in np.argsort(forward[:, 0]))
        backward = orientations.ornt_transform(target, source)
        return cls(affine.copy(), shape, canonical_affine, canonical_shape, forward, backward)

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.canonical_affine)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Source grid -> canonical grid (last three axes)."""
        _check_spatial(array, "array")
        if tuple(array.shape[-3:]) != self.source_shape:
            raise ValueError(f"array's spatial shape {array.shape[-3:]} is not the source "
                             f"shape {self.source_shape}")
        return _orient(array, self.to_canonical)

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Canonical grid -> source grid (last three axes), voxel for voxel."""
        _check_spatial(array, "array")
        if tuple(array.shape[-3:]) != self.canonical_shape:
            raise ValueError(f"array's spatial shape {array.shape[-3:]} is not the canonical "
                             f"shape {self.canonical_shape}")
        return _orient(array, self.from_canonical)


def target_shape(shape: Sequence[int], spacing: Sequence[float],
                 target_spacing: float | Sequence[float]) -> tuple[int, int, int]:
    """Spatial shape that covers the same field of view at `target_spacing`."""
    spacing = _triple(spacing, "spacing")
    target = _triple(target_spacing, "target_spacing")
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape[-3:], spacing, target))


def resampled_affine(affine: np.ndarray, shape: Sequence[int],
                     new_shape: Sequence[int]) -> np.ndarray:
    """Affine of the grid `resample` produces: same field of view, voxel centres aligned."""
    scale = np.array(shape[-3:], dtype=np.float64) / np.array(new_shape[-3:], dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    # New voxel i has its centre at old continuous index (i + 0.5) * scale - 0.5.
    index_map[:3, 3] = (scale - 1.0) / 2.0
    return affine @ index_map


def resample(array: np.ndarray, shape: Sequence[int], labels: bool = False) -> np.ndarray:
    """Resample the last three axes to `shape`: trilinear, or nearest when `labels`.

    Intensities come back as float32; label maps keep their integer dtype.
    """
    _check_spatial(array, "array")
    shape = tuple(int(n) for n in shape[-3:])
    if any(n < 1 for n in shape):
        raise ValueError(f"target shape must be positive, got {shape}")
    if tuple(array.shape[-3:]) == shape:
        return array.copy() if labels else array.astype(np.float32)
    lead = array.shape[:-3]
    batch = array.reshape(1, -1, *array.shape[-3:])
    if labels:
        if array.dtype.kind not in "iub":
            raise ValueError(f"label maps must be integer arrays, got {array.dtype}; use "
                             "labels=False for intensities and probabilities")
        if array.size and (int(array.min()) < 0 or int(array.max()) > 2**24):
            raise ValueError("label values must lie in [0, 2**24] to be resampled")
        # uint8 goes through torch as is; wider ids ride in float32, exact up to 2**24.
        work = torch.from_numpy(np.ascontiguousarray(
            batch if array.dtype == np.uint8 else batch.astype(np.float32)))
        out = F.interpolate(work, size=shape, mode="nearest-exact").numpy().astype(array.dtype)
    else:
        work = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        out = F.interpolate(work, size=shape, mode="trilinear", align_corners=False).numpy()
    return out.reshape(*lead, *shape)


def resample_to_spacing(array: np.ndarray, affine: np.ndarray,
                        target_spacing: float | Sequence[float],
                        labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Resample to `target_spacing` (mm); returns the array and its new affine."""
    _check_spatial(array, "array")
    shape = target_shape(array.shape, voxel_spacing(affine), target_spacing)
    return resample(array, shape, labels), resampled_affine(affine, array.shape, shape)


@dataclass(frozen=True)
class Padding:
    """Voxels added before and after each spatial axis."""

    before: tuple[int, int, int]
    after: tuple[int, int, int]

    def crop(self, array: np.ndarray) -> np.ndarray:
        """Remove the padding from the last three axes."""
        _check_spatial(array, "array")
        index = tuple(slice(b, n - a) for b, a, n in zip(self.before, self.after, array.shape[-3:]))
        return array[(..., *index)]

    def shift_affine(self, affine: np.ndarray) -> np.ndarray:
        """Affine of the padded grid, so the padded volume stays in place in world space."""
        return affine @ nib.affines.from_matvec(np.eye(3), -np.array(self.before, dtype=np.float64))


def pad_to_multiple(array: np.ndarray, multiple: int | Sequence[int],
                    value: float = 0) -> tuple[np.ndarray, Padding]:
    """Pad the last three axes, centred, up to multiples of `multiple` (the network's stride)."""
    _check_spatial(array, "array")
    multiples = (multiple,) * 3 if np.isscalar(multiple) else tuple(multiple)
    if len(multiples) != 3 or not all(int(m) == m and m >= 1 for m in multiples):
        raise ValueError(f"multiple must be one positive integer or three, got {multiple!r}")
    shape = array.shape[-3:]
    total = [(-n) % int(m) for n, m in zip(shape, multiples)]
    padding = Padding(tuple(t // 2 for t in total), tuple(t - t // 2 for t in total))
    widths = [(0, 0)] * (array.ndim - 3) + list(zip(padding.before, padding.after))
    return np.pad(array, widths, mode="constant", constant_values=value), padding
