"""Reading and writing NIfTI volumes, every failure reported as a `DataError` naming the file.

A volume is read completely when it is opened, so a truncated `.nii.gz` fails here, at the first
read, and not later inside training. Refused: files nibabel cannot parse (random bytes, an empty
file, a damaged gzip stream, a truncated payload), formats other than NIfTI-1/NIfTI-2, volumes
that are not 3D (or 4D with channels last, the Medical Segmentation Decathlon's multi-modal layout),
an affine that is not finite and invertible, non-finite intensities, and label maps whose values
are not whole numbers. Writing a prediction keeps the source affine and header (sform/qform codes,
units, description); only the data type and scaling change.
"""
from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataError

NIFTI_ENDINGS = (".nii.gz", ".nii")

_IMAGE_CLASSES = {nib.Nifti1Header: nib.Nifti1Image, nib.Nifti2Header: nib.Nifti2Image}


@dataclass(frozen=True, eq=False)
class Volume:
    """The data of one NIfTI file with the grid it lives on."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (the column norms of the affine's 3x3 block)."""
    return tuple(float(s) for s in nib.affines.voxel_sizes(affine))


def _open(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        img = nib.load(path)
    # nibabel, gzip and zlib raise a dozen unrelated types for a damaged file (ImageFileError,
    # EOFError, zlib.error, BadGzipFile, struct and numpy errors); each means the same thing to
    # the user, and the original is chained as the cause.
    except Exception as exc:
        raise DataError(path, f"cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"is a {type(img).__name__}, not a NIfTI-1/NIfTI-2 image")
    if img.ndim not in (3, 4):
        raise DataError(path, f"has {img.ndim} dimensions {img.shape}; expected a 3D volume "
                              "(or 4D with channels last)")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, f"has a non-finite or singular affine:\n{affine}")
    return img


def _payload(img: nib.Nifti1Image, path: Path, read) -> np.ndarray:
    try:
        return read(img)
    except Exception as exc:  # a truncated or corrupt payload; see _open
        raise DataError(path, f"image data is truncated or corrupt "
                              f"({type(exc).__name__}: {exc})") from exc


def read_image(path: str | PathLike[str]) -> Volume:
    """Intensities as float32 with the header's scaling applied (HU for CT)."""
    path = Path(path)
    img = _open(path)
    data = _payload(img, path, lambda i: i.get_fdata(dtype=np.float32))
    if not np.isfinite(data).all():
        raise DataError(path, f"holds {int((~np.isfinite(data)).sum())} NaN or infinite voxels")
    return Volume(data, img.affine.copy(), img.header.copy(), path)


def read_labels(path: str | PathLike[str]) -> Volume:
    """An integer label map, in the dtype stored on disk (floats are accepted if whole)."""
    path = Path(path)
    img = _open(path)
    data = _payload(img, path, lambda i: np.asanyarray(i.dataobj))
    if data.dtype.kind == "f":
        # Some converters write label maps as float32; they are fine as long as every value is
        # a whole number, which an int cast would otherwise hide.
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise DataError(path, "label map holds non-integer values")
        data = data.astype(np.int64)
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype.kind not in "iu":
        raise DataError(path, f"label map has data type {data.dtype}; expected integers")
    return Volume(data, img.affine.copy(), img.header.copy(), path)


def looks_like_label_map(path: str | PathLike[str], max_labels: int = 64) -> bool:
    """Whether a 3D file's values look like a label map rather than an image: whole numbers,
    none negative, at most `max_labels` distinct ones (judged on every 4th voxel along each
    axis, so a folder can be sorted without reading every volume whole). A CT image has
    negative HU; an MR image has many distinct values."""
    path = Path(path)
    img = _open(path)
    if img.ndim != 3:
        return False
    sample = _payload(img, path, lambda i: np.asanyarray(i.dataobj[::4, ::4, ::4]))
    if sample.dtype.kind == "f" and not np.array_equal(sample, np.round(sample)):
        return False
    return bool(sample.size) and sample.min() >= 0 and np.unique(sample).size <= max_labels


def write_like(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header,
               path: str | PathLike[str]) -> Path:
    """Write `data` with a source `affine` and `header`, e.g. a prediction beside its CT.

    The header's sform/qform codes, units and description are kept; the data type becomes the
    one of `data` and any intensity scaling of the source is dropped (a label map is stored raw).
    """
    path = Path(path)
    if data.shape[:3] != tuple(int(n) for n in header.get_data_shape()[:3]):
        raise DataError(path, f"data shape {data.shape} does not match the source header's "
                              f"grid {header.get_data_shape()}")
    hdr = header.copy()
    hdr.set_data_dtype(data.dtype)
    hdr.set_slope_inter(None, None)
    img = _IMAGE_CLASSES[type(hdr)](data, affine, hdr)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path
