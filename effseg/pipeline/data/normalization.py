"""nnU-Net's CT intensity normalization, fitted once on the training set and kept in the plans.

Fitting gathers the intensities of foreground voxels (training label > 0, so a label subset sets
the foreground) from every training case: up to `samples_per_case` of them per case, drawn
reproducibly from `seed` (nnU-Net draws 10,000), or all of them. Over the pooled values it takes
the 0.5 and 99.5 percentiles, the mean and the standard deviation; the mean and deviation are of
the unclipped values, as in nnU-Net. Normalizing clips to the percentiles, then subtracts the mean
and divides by the deviation (floored at 1e-8, so a constant foreground does not divide by zero).

The statistics travel in a JSON "plans" dict under `"normalization"` (one entry per channel);
`save_plans` / `load_plans` write and read it. Refused: channels not named CT (only the CT scheme
is implemented), a training set without foreground voxels, a plans file that is not valid JSON or
lacks a statistic.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from .dataset import NiftiDataset
from .errors import DataError

PLANS_KEY = "normalization"
_STD_FLOOR = 1e-8


@dataclass(frozen=True)
class CTNormalization:
    """Clip to [lower, upper], then z-score with the foreground mean and std."""

    lower: float
    upper: float
    mean: float
    std: float

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalized float32 copy of `image` (HU)."""
        out = np.clip(np.asarray(image, dtype=np.float32), self.lower, self.upper)
        out -= np.float32(self.mean)
        out /= np.float32(max(self.std, _STD_FLOOR))
        return out

    @classmethod
    def fit(cls, values: np.ndarray) -> CTNormalization:
        """Statistics of a 1D sample of foreground intensities."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            raise ValueError("cannot fit a normalization on zero foreground voxels")
        lower, upper = np.percentile(values, [0.5, 99.5])
        return cls(float(lower), float(upper), float(values.mean()), float(values.std()))

    def to_dict(self) -> dict:
        return {"scheme": "CT", **asdict(self)}

    @classmethod
    def from_dict(cls, entry: object, source: str | PathLike[str] = "plans") -> CTNormalization:
        if not isinstance(entry, Mapping):
            raise DataError(source, f"normalization entry must be an object, got {entry!r}")
        if entry.get("scheme") != "CT":
            raise DataError(source, f"normalization scheme {entry.get('scheme')!r} is not 'CT'")
        values = {}
        for field in ("lower", "upper", "mean", "std"):
            value = entry.get(field)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or not math.isfinite(value):
                raise DataError(source, f"normalization field {field!r} must be a finite number, "
                                        f"got {value!r}")
            values[field] = float(value)
        if values["lower"] > values["upper"] or values["std"] < 0:
            raise DataError(source, f"inconsistent normalization statistics {values}")
        return cls(**values)


def foreground_samples(image: np.ndarray, label: np.ndarray, max_samples: int | None,
                       rng: np.random.Generator) -> np.ndarray:
    """Intensities of `image` (X, Y, Z) where `label` > 0; at most `max_samples`, drawn by `rng`."""
    values = image[label > 0]
    if max_samples is not None and values.size > max_samples:
        values = rng.choice(values, size=max_samples, replace=False)
    return values


def fit_ct_normalization(dataset: NiftiDataset, samples_per_case: int | None = 10_000,
                         seed: int = 1234) -> list[CTNormalization]:
    """One `CTNormalization` per channel, from the foreground of every training case."""
    not_ct = [name for name in dataset.channels if name.strip().upper() != "CT"]
    if not_ct:
        raise DataError(dataset.json_path, f"channels {not_ct} are not CT; only CT normalization "
                                           "is implemented")
    rng = np.random.default_rng(seed)
    pooled: list[list[np.ndarray]] = [[] for _ in dataset.channels]
    for case in dataset:
        for channel, image in enumerate(case.image):
            pooled[channel].append(foreground_samples(image, case.label, samples_per_case, rng))
    return fit_pooled(dataset, pooled)


def fit_pooled(dataset: NiftiDataset, pooled) -> list[CTNormalization]:
    """One CTNormalization per channel from foreground samples pooled over the cases
    (`pooled[channel]` is a list of sample arrays)."""
    stats = []
    for parts in pooled:
        values = np.concatenate(parts) if parts else np.empty(0)
        if values.size == 0:
            raise DataError(dataset.root, f"no foreground voxels (label > 0) in the training "
                                          f"cases; classes {dataset.classes[1:]}")
        stats.append(CTNormalization.fit(values))
    return stats


def normalization_to_plans(plans: Mapping, stats: Iterable[CTNormalization]) -> dict:
    """A copy of `plans` holding `stats` (one per channel)."""
    return {**plans, PLANS_KEY: [s.to_dict() for s in stats]}


def normalization_from_plans(plans: Mapping,
                             source: str | PathLike[str] = "plans") -> list[CTNormalization]:
    """The per-channel statistics stored by `normalization_to_plans`."""
    entries = plans.get(PLANS_KEY)
    if not isinstance(entries, list) or not entries:
        raise DataError(source, f"plans hold no {PLANS_KEY!r} list")
    return [CTNormalization.from_dict(e, source) for e in entries]


def save_plans(plans: Mapping, path: str | PathLike[str]) -> Path:
    """Write a plans dict as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plans, indent=2, sort_keys=True) + "\n")
    return path


def load_plans(path: str | PathLike[str]) -> dict:
    """Read a plans dict written by `save_plans`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "plans file not found")
    try:
        plans = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"is not valid JSON ({exc})") from exc
    if not isinstance(plans, dict):
        raise DataError(path, "plans must be a JSON object")
    return plans
