"""The built-in default dataset: a deterministic synthetic abdominal CT phantom.

Each case is an axial slab from the lung bases down to the kidneys, built on an RAS grid (first
axis towards the patient's right, second anterior, third superior) from smooth shapes: a body
outline with subcutaneous fat, an abdominal muscle wall, paraspinal muscles, a heart, lungs, a
two-lobed liver, spleen, kidneys, a vertebral column (bodies with a dense rim, discs between them,
spinous processes) and the aorta. Anatomy is laid out in coordinates normalised to the field of
view, so any shape and spacing holds the whole body. Every case gets its own smooth random warp
of the whole body plus per-organ shifts, scales, rotations and surface warps, then partial-volume
blur, a soft-tissue texture and Gaussian noise.

Labels (`LABELS`; background 0):

    1 liver  2 spleen  3 kidney_left  4 kidney_right  5 lung_left  6 lung_right  7 aorta  8 spine

`spine` is the bone of the vertebrae; discs, heart and muscles are unlabelled. Mean HU of each
tissue (`HU`) follows a non-contrast CT, except the aorta, which has mild arterial contrast.

Everything derives from the seed through numpy's `Generator`, so one seed gives byte-identical
arrays (and files) on a machine. Refused: shapes with an axis under 16 voxels (organs would
vanish) and non-positive spacings.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4,
          "lung_left": 5, "lung_right": 6, "aorta": 7, "spine": 8}

HU = {"air": -1000.0, "lung": -850.0, "fat": -100.0, "visceral": -30.0, "muscle": 40.0,
      "heart": 40.0, "liver": 60.0, "spleen": 50.0, "kidney": 30.0, "aorta": 150.0,
      "cancellous_bone": 450.0, "cortical_bone": 700.0, "disc": 80.0}

NOISE_HU = 20.0
TEXTURE_HU = 10.0
MIN_AXIS = 16


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine with the volume centred on the world origin."""
    spacing = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * spacing
    return affine


class _Body:
    """Normalised grid coordinates of one case, warped by the case's deformation."""

    def __init__(self, shape, spacing, rng: np.random.Generator):
        self.rng = rng
        half_xy = min(shape[0] * spacing[0], shape[1] * spacing[1]) / 2.0
        half = (half_xy, half_xy, shape[2] * spacing[2] / 2.0)
        axes = [((np.arange(n) - (n - 1) / 2.0) * s / h).astype(np.float32)
                for n, s, h in zip(shape, spacing, half)]
        self.z_mm = ((np.arange(shape[2]) - (shape[2] - 1) / 2.0) * spacing[2]).astype(np.float32)
        grid = [np.broadcast_to(g, shape) for g in np.meshgrid(*axes, indexing="ij", sparse=True)]
        self.uvw = [c + d for c, d in zip(grid, self._displacement(grid, 0.035, 1.0))]

    def _displacement(self, points, amplitude: float, frequency: float):
        """A smooth random field: two plane waves of random direction per component."""
        out = []
        for _ in range(3):
            field = np.zeros(points[0].shape, dtype=np.float32)
            for _ in range(2):
                k = self.rng.normal(0.0, frequency, 3).astype(np.float32) * np.float32(np.pi)
                phase = np.float32(self.rng.uniform(0.0, 2.0 * np.pi))
                a = np.float32(self.rng.uniform(0.5, 1.0) * amplitude)
                field += a * np.sin(k[0] * points[0] + k[1] * points[1] + k[2] * points[2] + phase)
            out.append(field)
        return out

    def ellipsoid(self, centre, radii, jitter: float = 0.03, scale: float = 0.1,
                  rotate_deg: float = 0.0, surface: float = 0.02) -> np.ndarray:
        """Mask of an ellipsoid with a random shift, scale, in-plane rotation and surface warp."""
        rng = self.rng
        c = np.float32(centre) + rng.uniform(-jitter, jitter, 3).astype(np.float32)
        r = np.float32(radii) * rng.uniform(1 - scale, 1 + scale, 3).astype(np.float32)
        angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg)) if rotate_deg else 0.0
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        rel = [p - ci for p, ci in zip(self.uvw, c)]
        rel = [p + d for p, d in zip(rel, self._displacement(rel, surface, 2.5))]
        du = cos * rel[0] + sin * rel[1]
        dv = -sin * rel[0] + cos * rel[1]
        return (du / r[0]) ** 2 + (dv / r[1]) ** 2 + (rel[2] / r[2]) ** 2 <= 1.0

    def cylinder(self, centre, radii, jitter: float = 0.02) -> np.ndarray:
        """Mask of an elliptic cylinder along the body axis."""
        c = np.float32(centre) + self.rng.uniform(-jitter, jitter, 2).astype(np.float32)
        u, v = (self.uvw[0] - c[0]) / radii[0], (self.uvw[1] - c[1]) / radii[1]
        return u**2 + v**2 <= 1.0


def phantom_case(shape: Sequence[int] = (96, 96, 64), spacing: Sequence[float] = (3.0, 3.0, 3.0),
                 seed: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: (int16 HU image, uint8 label map, RAS affine)."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < MIN_AXIS:
        raise ValueError(f"shape must be three axes of at least {MIN_AXIS} voxels, got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    rng = np.random.default_rng(seed)
    body = _Body(shape, spacing, rng)
    hu = np.full(shape, HU["air"], dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    def paint(mask, value, name=None):
        hu[mask] = value
        label[mask] = LABELS[name] if name else 0

    size = rng.uniform(0.9, 1.0)
    outline = np.array([0.88, 0.66]) * size
    fat, wall = rng.uniform(0.05, 0.10), rng.uniform(0.04, 0.06)
    paint(body.cylinder((0.0, 0.0), outline), HU["fat"])
    paint(body.cylinder((0.0, 0.0), outline - fat, jitter=0.0), HU["muscle"])
    cavity = body.cylinder((0.0, 0.0), outline - fat - wall, jitter=0.0)
    paint(cavity, HU["visceral"])
    for side, name in ((-1, "lung_left"), (1, "lung_right")):
        lung = body.ellipsoid((0.42 * side, -0.02, 0.85), (0.33, 0.42, 0.75))
        paint(cavity & lung, HU["lung"], name)
    paint(cavity & body.ellipsoid((-0.1, 0.25, 0.85), (0.22, 0.2, 0.3)), HU["heart"])
    liver = (body.ellipsoid((0.38, 0.05, 0.15), (0.36, 0.40, 0.45), rotate_deg=10)
             | body.ellipsoid((0.12, 0.2, 0.22), (0.3, 0.17, 0.22)))
    paint(cavity & liver, HU["liver"], "liver")
    paint(cavity & body.ellipsoid((-0.5, -0.2, 0.25), (0.15, 0.24, 0.28), rotate_deg=25),
          HU["spleen"], "spleen")
    for side, name, lift in ((-1, "kidney_left", 0.06), (1, "kidney_right", 0.0)):
        paint(cavity & body.ellipsoid((0.32 * side, -0.3, -0.5 + lift), (0.12, 0.15, 0.32),
                                      rotate_deg=20), HU["kidney"], name)
    for side in (-1, 1):
        paint(body.ellipsoid((0.2 * side, -0.55, 0.0), (0.11, 0.1, 2.0), jitter=0.01), HU["muscle"])
    paint(body.cylinder((-0.08, -0.19), (0.07, 0.07)), HU["aorta"], "aorta")

    column = body.cylinder((0.0, -0.43), (0.12, 0.11), jitter=0.01)
    core = body.cylinder((0.0, -0.43), (0.09, 0.08), jitter=0.0)
    spinous = body.ellipsoid((0.0, -0.64, 0.0), (0.035, 0.09, 2.0), jitter=0.01, scale=0.05)
    # Vertebrae repeat every ~30 mm along the body axis with a ~7 mm disc between them.
    period = rng.uniform(28.0, 34.0)
    disc = ((body.z_mm - rng.uniform(0.0, period)) % period) < 7.0
    disc = np.broadcast_to(disc, shape)
    bone = (column | spinous) & ~disc
    paint(column & disc, HU["disc"])
    paint(bone, HU["cortical_bone"], "spine")
    hu[bone & core] = HU["cancellous_bone"]

    # Partial volume at organ borders, a soft-tissue texture, then scanner noise.
    hu = ndimage.gaussian_filter(hu, sigma=0.6)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=2.0)
    texture *= np.float32(TEXTURE_HU / max(float(texture.std()), 1e-6))
    hu += np.where(hu > -500.0, texture, np.float32(0.0))
    hu += rng.normal(0.0, NOISE_HU, shape).astype(np.float32)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return image, label, phantom_affine(shape, spacing)


def make_phantom_dataset(out_dir: str | PathLike[str], num_cases: int = 4,
                         shape: Sequence[int] = (96, 96, 64),
                         spacing: Sequence[float] = (3.0, 3.0, 3.0), seed: int = 0) -> Path:
    """Write `num_cases` phantom cases as an nnU-Net v2 dataset in `out_dir` (new or empty).

    Case i is `phantom_{i:03d}`, generated from the seed sequence (seed, i).
    """
    out = Path(out_dir)
    if num_cases < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; the phantom dataset needs a new or empty folder")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    for i in range(num_cases):
        image, label, affine = phantom_case(shape, spacing, seed=(seed, i))
        name = f"phantom_{i:03d}"
        for data, path in ((image, out / "imagesTr" / f"{name}_0000.nii.gz"),
                           (label, out / "labelsTr" / f"{name}.nii.gz")):
            img = nib.Nifti1Image(data, affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, path)
    meta = {
        "name": "effseg_phantom",
        "description": "Synthetic abdominal CT phantom generated by effseg.pipeline.data.phantom",
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "phantom": {"seed": seed, "shape": list(shape), "spacing": list(spacing)},
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
