"""A segmentation dataset in the nnU-Net v2 or Medical Segmentation Decathlon layout.

nnU-Net v2 layout (what `make_phantom_dataset` writes):

    root/dataset.json               channel_names, labels, numTraining, file_ending
    root/imagesTr/{case}_0000{ending}   one file per channel, _0000, _0001, ...
    root/labelsTr/{case}{ending}
    root/imagesTs/{case}_0000{ending}   optional, unlabelled

Decathlon layout: dataset.json has a `training` list of `{"image", "label"}` paths (and optionally
a `test` list), `modality` (or `channel_names`), `labels` as id -> name, `numTraining`; a
multi-channel image is one 4D file with channels last.

Opening a dataset reads dataset.json and lists the files, which is cheap and catches missing fields,
missing files and a wrong `numTraining` at once. `validate()` then reads every volume, so a broken
file stops a run before training starts rather than half-way. Refused, each as a `DataError` naming
the file: a missing dataset.json or field, a file ending other than NIfTI, an image file whose name
does not follow `{case}_{channel:04d}{ending}`, a missing channel or label file, channels or labels
on a grid (shape or affine) other than the first channel's, and label values not declared.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataError
from .labels import LabelMap, parse_labels
from .nifti import NIFTI_ENDINGS, Volume, read_image, read_labels, voxel_spacing

# Two grids are the same when every affine entry agrees to 1 micrometre: far below any voxel,
# far above the float32 rounding of sform/qform rows written by different tools.
GRID_ATOL_MM = 1e-3

NNUNET_FIELDS = ("channel_names", "labels", "numTraining", "file_ending")
MSD_FIELDS = ("labels", "numTraining", "training")


@dataclass(frozen=True, eq=False)
class Case:
    """One loaded case on its source grid.

    `image` is (channels, X, Y, Z) float32 (HU for CT); `label` is (X, Y, Z) training class ids
    (None for an unlabelled test case); `affine` and `header` are the first channel's.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    header: nib.Nifti1Header
    image_paths: tuple[Path, ...]
    label_path: Path | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)


@dataclass(frozen=True)
class _CaseFiles:
    name: str
    images: tuple[Path, ...]
    label: Path | None
    channels_last: bool


def _same_grid(a: Volume, b: Volume) -> str | None:
    if a.shape[:3] != b.shape[:3]:
        return f"grid shape {b.shape[:3]} differs from {a.shape[:3]} of {a.path}"
    if not np.allclose(a.affine, b.affine, rtol=0.0, atol=GRID_ATOL_MM):
        return (f"affine differs from that of {a.path} by up to "
                f"{np.abs(a.affine - b.affine).max():.4g} mm:\n{b.affine}\nvs\n{a.affine}")
    return None


def _ending(path: str) -> str | None:
    return next((e for e in NIFTI_ENDINGS if path.endswith(e)), None)


class NiftiDataset:
    """Cases of a dataset folder; `classes` selects and orders the foreground labels by name.

    Indexing and iteration yield training cases (`Case`); `load_test_case` loads an unlabelled one.
    """

    def __init__(self, root: str | PathLike[str], classes: Sequence[str] | None = None):
        self.root = Path(root)
        self.json_path = self.root / "dataset.json"
        meta = self._read_json()
        self.layout = "msd" if "training" in meta else "nnunetv2"
        required = MSD_FIELDS if self.layout == "msd" else NNUNET_FIELDS
        missing = [f for f in required if f not in meta]
        if self.layout == "msd" and "modality" not in meta and "channel_names" not in meta:
            missing.append("modality (or channel_names)")
        if missing:
            layout = "Decathlon" if self.layout == "msd" else "nnU-Net v2"
            raise DataError(self.json_path, f"missing field(s) {missing} ({layout} layout)")
        self.meta = meta
        self.channels = self._channel_names(meta.get("channel_names", meta.get("modality")))
        declared = parse_labels(meta["labels"], self.json_path)
        self.labels = LabelMap(declared, classes, self.json_path)
        if self.layout == "msd":
            self.file_ending = None
            self._train = self._msd_cases(meta["training"], "training", labelled=True)
            self._test = self._msd_cases(meta.get("test", []), "test", labelled=False)
        else:
            self.file_ending = meta["file_ending"]
            if self.file_ending not in NIFTI_ENDINGS:
                raise DataError(self.json_path, f"file_ending {self.file_ending!r} is not "
                                                f"supported; expected one of {NIFTI_ENDINGS}")
            self._train = self._nnunet_cases(self.root / "imagesTr", self.root / "labelsTr")
            self._test = self._nnunet_cases(self.root / "imagesTs", None)
        num_training = meta["numTraining"]
        if not isinstance(num_training, int) or isinstance(num_training, bool):
            raise DataError(self.json_path, f"numTraining must be an integer, got {num_training!r}")
        if num_training != len(self._train):
            raise DataError(self.json_path, f"numTraining is {num_training} but {len(self._train)} "
                                            "training cases were found")

    def _read_json(self) -> dict:
        if not self.json_path.is_file():
            raise DataError(self.json_path, "dataset.json not found")
        try:
            meta = json.loads(self.json_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(self.json_path, f"is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise DataError(self.json_path, "must hold a JSON object")
        return meta

    def _channel_names(self, raw: object) -> tuple[str, ...]:
        if not isinstance(raw, dict) or not raw:
            raise DataError(self.json_path, f"channel names must be a non-empty mapping "
                                            f"index -> name, got {raw!r}")
        keys = sorted(raw, key=lambda k: int(k) if str(k).isdigit() else -1)
        if [str(k) for k in keys] != [str(i) for i in range(len(raw))]:
            raise DataError(self.json_path, f"channel indices must be 0..{len(raw) - 1}, "
                                            f"got {list(raw)}")
        return tuple(str(raw[k]) for k in keys)

    def _nnunet_cases(self, images_dir: Path, labels_dir: Path | None) -> tuple[_CaseFiles, ...]:
        if not images_dir.is_dir():
            if labels_dir is None:
                return ()
            raise DataError(images_dir, "folder not found")
        pattern = re.compile(r"(.+)_(\d{4})" + re.escape(self.file_ending) + r"$")
        found: dict[str, set[int]] = {}
        for path in sorted(images_dir.iterdir()):
            if path.name.startswith(".") or not path.name.endswith(self.file_ending):
                continue
            match = pattern.match(path.name)
            if match is None:
                raise DataError(path, f"image name does not follow {{case}}_{{channel:04d}}"
                                      f"{self.file_ending}")
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
        cases = []
        for name, channels in sorted(found.items()):
            images = tuple(images_dir / f"{name}_{c:04d}{self.file_ending}"
                           for c in range(len(self.channels)))
            for c, path in enumerate(images):
                if c not in channels:
                    raise DataError(path, f"channel {c} ({self.channels[c]}) of case {name!r} "
                                          "is missing")
            extra = sorted(channels - set(range(len(self.channels))))
            if extra:
                raise DataError(images[0].with_name(f"{name}_{extra[0]:04d}{self.file_ending}"),
                                f"channel {extra[0]} is not declared in channel_names "
                                f"({len(self.channels)} channel(s))")
            label = None
            if labels_dir is not None:
                label = labels_dir / f"{name}{self.file_ending}"
                if not label.is_file():
                    raise DataError(label, f"label file of case {name!r} not found")
            cases.append(_CaseFiles(name, images, label, channels_last=False))
        if labels_dir is not None and labels_dir.is_dir():
            for path in sorted(labels_dir.iterdir()):
                name = path.name[: -len(self.file_ending)]
                if (path.name.endswith(self.file_ending) and not path.name.startswith(".")
                        and name not in found):
                    raise DataError(path, f"label file has no image (expected {images_dir.name}/"
                                          f"{name}_0000{self.file_ending})")
        return tuple(cases)

    def _msd_cases(self, entries: object, field: str, labelled: bool) -> tuple[_CaseFiles, ...]:
        if not isinstance(entries, list):
            raise DataError(self.json_path, f"{field!r} must be a list, "
                                            f"got {type(entries).__name__}")
        cases = []
        for i, entry in enumerate(entries):
            if labelled:
                if not isinstance(entry, dict) or not {"image", "label"} <= entry.keys():
                    raise DataError(self.json_path, f"{field}[{i}] must be an object with 'image' "
                                                    f"and 'label', got {entry!r}")
                image, label = self.root / entry["image"], self.root / entry["label"]
            else:
                if not isinstance(entry, str):
                    raise DataError(self.json_path, f"{field}[{i}] must be a path, got {entry!r}")
                image, label = self.root / entry, None
            ending = _ending(image.name)
            if ending is None:
                raise DataError(image, f"is not a NIfTI file (expected one of {NIFTI_ENDINGS})")
            for path in (image, label):
                if path is not None and not path.is_file():
                    raise DataError(path, f"listed in {field}[{i}] of dataset.json but not found")
            cases.append(_CaseFiles(image.name[: -len(ending)], (image,), label,
                                    channels_last=len(self.channels) > 1))
        names = [c.name for c in cases]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DataError(self.json_path, f"{field} lists cases {repeated} more than once")
        return tuple(cases)

    @property
    def classes(self) -> tuple[str, ...]:
        """Training class names, background first; class i is label value i of a loaded case."""
        return self.labels.classes

    @property
    def cases(self) -> tuple[str, ...]:
        """Names of the labelled training cases, sorted."""
        return tuple(c.name for c in self._train)

    @property
    def test_cases(self) -> tuple[str, ...]:
        """Names of the unlabelled test cases (imagesTs / `test`), possibly empty."""
        return tuple(c.name for c in self._test)

    def __len__(self) -> int:
        return len(self._train)

    def __getitem__(self, index: int) -> Case:
        return self._load(self._train[index])

    def __iter__(self) -> Iterator[Case]:
        return (self._load(files) for files in self._train)

    def _files(self, name: str, split: Sequence[_CaseFiles], what: str) -> _CaseFiles:
        for files in split:
            if files.name == name:
                return files
        raise KeyError(f"{name!r} is not a {what} case of {self.root}")

    def image_paths(self, name: str) -> tuple[Path, ...]:
        """The image file(s) of a training or test case."""
        for split in (self._train, self._test):
            for files in split:
                if files.name == name:
                    return files.images
        raise KeyError(f"{name!r} is not a case of {self.root}")

    def label_path(self, name: str) -> Path:
        """The label file of a training case."""
        return self._files(name, self._train, "training").label

    def load_case(self, name: str) -> Case:
        """A training case with its label map remapped to training classes."""
        return self._load(self._files(name, self._train, "training"))

    def load_test_case(self, name: str) -> Case:
        """An unlabelled test case (its `label` is None)."""
        return self._load(self._files(name, self._test, "test"))

    def _load(self, files: _CaseFiles) -> Case:
        volumes = [read_image(p) for p in files.images]
        first = volumes[0]
        if files.channels_last:
            if first.data.ndim != 4 or first.data.shape[3] != len(self.channels):
                raise DataError(first.path, f"has shape {first.shape}; expected 4D with "
                                            f"{len(self.channels)} channels last")
            image = np.ascontiguousarray(np.moveaxis(first.data, 3, 0))
        else:
            for volume in volumes:
                if volume.data.ndim != 3:
                    raise DataError(volume.path, f"has shape {volume.shape}; expected one 3D "
                                                 "channel per file")
            for volume in volumes[1:]:
                problem = _same_grid(first, volume)
                if problem:
                    raise DataError(volume.path, problem)
            image = np.stack([v.data for v in volumes]) if len(volumes) > 1 else first.data[None]
        label = None
        if files.label is not None:
            stored = read_labels(files.label)
            if stored.data.ndim != 3:
                raise DataError(stored.path, f"label map has shape {stored.shape}; expected 3D")
            problem = _same_grid(first, stored)
            if problem:
                raise DataError(stored.path, problem)
            label = self.labels.to_training(stored.data, stored.path)
        return Case(files.name, image, label, first.affine, first.header, files.images, files.label)

    def validate(self, test: bool = True) -> None:
        """Read every training (and test) case; raise one `DataError` listing every bad file."""
        problems = []
        for files in self._train + (self._test if test else ()):
            try:
                self._load(files)
            except DataError as exc:
                problems.append(exc)
        if problems:
            listing = "\n".join(f"  {p}" for p in problems)
            raise DataError(self.root, f"{len(problems)} case(s) failed validation:\n{listing}",
                            problems)
