"""From a case on disk to the network's grid, and the run's cache of preprocessed cases.

The network grid of a case: its source grid reoriented to RAS (`Reorientation`, no resampling),
then resampled to the run's target spacing (image trilinear, label map nearest). Intensities are
then CT-normalized per channel (`CTNormalization`). `to_network_grid` is the geometric part,
shared by training and `predict`, which undoes it.

`preprocess_cases` reads every case of a run once and writes, in a cache folder,
`{case}_image.npy` (float32 (C, X, Y, Z), normalized) and `{case}_label.npy` (class ids): epochs
then read arrays instead of decoding and resampling NIfTI files. The normalization statistics are
fitted on the training cases only (foreground voxels of their source grid, up to 10,000 per case
drawn from the run's seed, as nnU-Net does), so validation cases do not leak into them; they are
applied in a second pass over the cached arrays, so each NIfTI file is decoded once.

Refused: a target spacing that is not three positive numbers (ValueError); channels other than
CT and training cases without foreground (`DataError`, as every dataset problem of the data
layer).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .data import (
    CTNormalization,
    DataError,
    NiftiDataset,
    Reorientation,
    resample,
    target_shape,
)
from .data.normalization import fit_pooled, foreground_samples

SAMPLES_PER_CASE = 10_000


def canonical_spacing(image_path: str | Path) -> tuple[float, float, float]:
    """Voxel spacing (mm) of an image file along the RAS axes, read from its header only."""
    img = nib.load(image_path)
    return Reorientation.of(img.affine, img.shape[:3]).canonical_spacing


def median_spacing(dataset: NiftiDataset, cases: Sequence[str]) -> tuple[float, float, float]:
    """Per-axis median of the cases' RAS spacings: nnU-Net's default target spacing."""
    spacings = np.array([canonical_spacing(dataset.image_paths(c)[0]) for c in cases])
    return tuple(float(s) for s in np.median(spacings, axis=0))


def network_shape(reorientation: Reorientation,
                  target_spacing: Sequence[float]) -> tuple[int, int, int]:
    """Spatial shape of a source grid once reoriented and resampled to `target_spacing`."""
    return target_shape(reorientation.canonical_shape, reorientation.canonical_spacing,
                        target_spacing)


def to_network_grid(array: np.ndarray, reorientation: Reorientation,
                    target_spacing: Sequence[float], labels: bool = False) -> np.ndarray:
    """An array on its source grid (last three axes) -> RAS, resampled to `target_spacing`."""
    canonical = reorientation.apply(array)
    return resample(canonical, network_shape(reorientation, target_spacing), labels=labels)


def normalize(image: np.ndarray, stats: Sequence[CTNormalization]) -> np.ndarray:
    """(C, X, Y, Z) intensities normalized channel by channel."""
    if len(stats) != image.shape[0]:
        raise ValueError(f"effseg: {len(stats)} normalization(s) for {image.shape[0]} channel(s)")
    return np.stack([s(channel) for s, channel in zip(stats, image)])


def cache_paths(folder: Path, case: str) -> tuple[Path, Path]:
    """Where the cache keeps a case's image and label arrays."""
    return folder / f"{case}_image.npy", folder / f"{case}_label.npy"


def preprocess_cases(dataset: NiftiDataset, train_cases: Sequence[str],
                     other_cases: Sequence[str], target_spacing: Sequence[float],
                     folder: str | Path, seed: int) -> tuple[list[CTNormalization], dict]:
    """Cache every case on the network grid; returns (normalization, {case: network shape}).

    The normalization is fitted on `train_cases` only; `other_cases` (validation) are cached
    with it too.
    """
    not_ct = [n for n in dataset.channels if n.strip().upper() != "CT"]
    if not_ct:
        raise DataError(dataset.json_path, f"channels {not_ct} are not CT; only CT "
                                           "normalization is implemented")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    training = set(train_cases)
    rng = np.random.default_rng(seed)
    samples: list[list[np.ndarray]] = [[] for _ in dataset.channels]
    shapes = {}
    cases = list(train_cases) + list(other_cases)
    for name in tqdm(cases, desc="preprocess", unit="case", disable=None, leave=False):
        case = dataset.load_case(name)
        if name in training:
            for channel, image in enumerate(case.image):
                samples[channel].append(foreground_samples(image, case.label, SAMPLES_PER_CASE,
                                                           rng))
        reorientation = Reorientation.of(case.affine, case.shape)
        image = to_network_grid(case.image, reorientation, target_spacing)
        label = to_network_grid(case.label, reorientation, target_spacing, labels=True)
        image_path, label_path = cache_paths(folder, name)
        np.save(image_path, image)
        np.save(label_path, label)
        shapes[name] = list(image.shape[1:])
    stats = fit_pooled(dataset, samples)
    for name in cases:
        image_path, _ = cache_paths(folder, name)
        np.save(image_path, normalize(np.load(image_path), stats))
    return stats, shapes

