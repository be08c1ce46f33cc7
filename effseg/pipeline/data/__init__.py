"""effseg.pipeline.data: CT segmentation datasets on disk, their geometry and intensities.

- `NiftiDataset` (dataset.py): an nnU-Net v2 or Medical Segmentation Decathlon dataset folder;
  lists and loads cases, remaps a subset of labels by name to training classes, and `validate()`s
  every file up front.
- `Reorientation`, `resample`, `resample_to_spacing`, `pad_to_multiple` (geometry.py): the way from
  a source grid to the network's grid, each step with its exact inverse for predictions.
- `CTNormalization`, `fit_ct_normalization` (normalization.py): nnU-Net's CT normalization,
  fitted once and kept in a JSON plans dict.
- `make_phantom_dataset`, `phantom_case` (phantom.py): the built-in synthetic CT dataset.
- `read_image`, `read_labels`, `write_like` (nifti.py): NIfTI I/O that keeps the source header.
- `DataError` (errors.py): raised for every bad file, naming it.

Labels: `LabelMap` (labels.py) maps stored label ids to training classes and back.
"""
from .dataset import GRID_ATOL_MM, Case, NiftiDataset
from .errors import DataError
from .geometry import (
    Padding,
    Reorientation,
    pad_to_multiple,
    resample,
    resample_to_spacing,
    resampled_affine,
    target_shape,
)
from .labels import LabelMap, parse_labels
from .nifti import Volume, read_image, read_labels, voxel_spacing, write_like
from .normalization import (
    CTNormalization,
    fit_ct_normalization,
    load_plans,
    normalization_from_plans,
    normalization_to_plans,
    save_plans,
)
from .phantom import LABELS as PHANTOM_LABELS
from .phantom import make_phantom_dataset, phantom_case

__all__ = [
    "GRID_ATOL_MM", "PHANTOM_LABELS", "CTNormalization", "Case", "DataError", "LabelMap",
    "NiftiDataset", "Padding", "Reorientation", "Volume", "fit_ct_normalization", "load_plans",
    "make_phantom_dataset", "normalization_from_plans", "normalization_to_plans",
    "pad_to_multiple", "parse_labels", "phantom_case", "read_image", "read_labels", "resample",
    "resample_to_spacing", "resampled_affine", "save_plans", "target_shape", "voxel_spacing",
    "write_like",
]
