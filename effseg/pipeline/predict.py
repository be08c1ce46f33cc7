"""Whole-volume inference (`python -m effseg predict`): a label map in the source image's grid.

For each input case: read the image(s), reorient to RAS and resample to the checkpoint's target
spacing (`effseg.pipeline.preprocess.to_network_grid`), CT-normalize with the checkpoint's statistics, run
the whole volume through the network in one piece, softmax (with test-time mirroring, the mean over
the mirrorings along the axes the run was trained to mirror); then undo the geometry: the class
probabilities are resampled back to the RAS grid class by class (trilinear, the interpolation
`effseg.pipeline.data.resample` uses) while a running argmax keeps the winning class, so the full stack of
upsampled probabilities never exists unless it is asked for; the argmax is reoriented back to the
source axes and its class ids mapped to the dataset's own label ids. The label map is written with
the source image's affine and header (`effseg.pipeline.data.write_like`): same shape, affine, orientation.

`--probabilities` also writes `{case}_probabilities{ending}`: float32 (X, Y, Z, K) on the source
grid, the fourth axis in the checkpoint's class order (background first), listed in
`classes.json` beside it.

Inputs: one NIfTI file, or a folder of them. In a folder holding files named with nnU-Net's
`{case}_{channel:04d}` naming, those are the images (channels grouped per case, the prediction
named `{case}`) and other files (label maps lying beside them) are left out, each with a note;
otherwise each file is one case named by its file name (a multi-channel case as one 4D file,
channels last), except files whose values look like a label map, left out with a note. A single
file named `{case}_0000` gives the prediction `{case}`. A prediction that holds only background
gets a warning.

Refused: a folder without NIfTI files, a case missing a channel, a channel count other than the
checkpoint's, channels on different grids, a prediction that would overwrite one of the inputs;
unreadable images raise the data layer's `DataError`, an unusable checkpoint a
`CheckpointError`.
"""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import check_mirror_axes
from .data import GRID_ATOL_MM, DataError, LabelMap, Reorientation, read_image, write_like
from .data import normalization_from_plans
from .data.nifti import NIFTI_ENDINGS, looks_like_label_map
from .model_config import build_model
from .precision import amp_dtype, default_amp, default_device
from .preprocess import normalize, to_network_grid
from .run_checkpoint import CheckpointError, load_checkpoint

PLANS_FIELDS = ("channels", "classes", "label_ids", "target_spacing", "normalization")
_CHANNEL_NAME = re.compile(r"(.+)_(\d{4})$")


def _split_ending(path: Path) -> tuple[str, str]:
    for ending in NIFTI_ENDINGS:
        if path.name.endswith(ending):
            return path.name[: -len(ending)], ending
    raise DataError(path, f"is not a NIfTI file (expected one of {NIFTI_ENDINGS})")


def find_cases(input: str | PathLike[str],
               note: Callable[[str], None] | None = None) -> list[tuple[str, tuple[Path, ...], str]]:
    """(case name, image files, file ending) of a file or of the images in a folder.

    In a folder, files named with nnU-Net's channel suffix (`{case}_0000`) are the images when
    there are any, and the other files (label maps beside them) are left out; otherwise every
    file is a case, except files whose values look like a label map. Each file left out is
    told to `note`."""
    input = Path(input)
    note = note or (lambda message: None)
    if input.is_file():
        stem, ending = _split_ending(input)
        match = _CHANNEL_NAME.match(stem)
        return [(match.group(1) if match else stem, (input,), ending)]
    if not input.is_dir():
        raise DataError(input, "input not found")
    files = sorted(p for p in input.iterdir() if p.is_file() and not p.name.startswith(".")
                   and any(p.name.endswith(e) for e in NIFTI_ENDINGS))
    if not files:
        raise DataError(input, f"holds no NIfTI files ({' or '.join(NIFTI_ENDINGS)})")
    split = [(p, *_split_ending(p)) for p in files]
    matches = [_CHANNEL_NAME.match(stem) for _, stem, _ in split]
    if not any(matches):
        cases = []
        for path, stem, ending in split:
            if looks_like_label_map(path):
                note(f"skipped {path.name}: its values look like a label map (few whole "
                     "numbers, none negative), not an image")
            else:
                cases.append((stem, (path,), ending))
        if not cases:
            raise DataError(input, "holds no images, only label maps")
        return cases
    grouped: dict[str, dict[int, Path]] = {}
    endings: dict[str, str] = {}
    for (path, _, ending), match in zip(split, matches):
        if match is None:
            note(f"skipped {path.name}: no channel suffix (_0000) in a folder of nnU-Net-named "
                 "images")
            continue
        grouped.setdefault(match.group(1), {})[int(match.group(2))] = path
        endings[match.group(1)] = ending
    cases = []
    for name, channels in sorted(grouped.items()):
        expected = list(range(len(channels)))
        if sorted(channels) != expected:
            missing = sorted(set(range(max(channels) + 1)) - set(channels))
            raise DataError(channels[min(channels)].with_name(
                f"{name}_{missing[0]:04d}{endings[name]}"), f"channel {missing[0]} of case "
                                                           f"{name!r} is missing")
        cases.append((name, tuple(channels[c] for c in expected), endings[name]))
    return cases


class Predictor:
    """A trained network with what it needs to go from a source image to a label map."""

    def __init__(self, model: torch.nn.Module, plans: dict, device: torch.device,
                 amp_dtype: torch.dtype | None, mirror_axes: Sequence[int] = ()):
        self.model = model.to(device).eval()
        self.mirror_axes = check_mirror_axes(mirror_axes)
        self.plans = plans
        self.device = device
        self.amp_dtype = amp_dtype
        self.classes = list(plans["classes"])
        self.num_channels = len(plans["channels"])
        self.stats = normalization_from_plans(plans)
        self.labels = LabelMap(dict(zip(self.classes, plans["label_ids"])), self.classes[1:])
        self.last_empty = False  # whether the last predict_case found only background

    def label_table(self) -> dict:
        """The predictions' labels as dataset.json writes them: {"labels": {name: id}}."""
        return {"labels": {n: int(i) for n, i in zip(self.classes, self.labels.source_ids)}}

    @classmethod
    def from_checkpoint(cls, path: str | PathLike[str], device: str | torch.device | None = None,
                        amp: str | None = None, tta: bool | None = None) -> Predictor:
        """Load `best.pt` or `last.pt` of a run (weights-only); device default: CUDA when
        available; amp default: bf16 on GPUs that support it, off elsewhere; tta (test-time
        mirroring along the run's training mirror axes) default: on when the run mirrored."""
        state = load_checkpoint(path)
        missing = [k for k in ("model", "model_config", "plans") if k not in state]
        missing += [f"plans.{k}" for k in PLANS_FIELDS if k not in state.get("plans", {})]
        if missing:
            raise CheckpointError(path, f"lacks {missing}; it cannot drive a prediction")
        try:
            model = build_model(state["model_config"])
            model.load_state_dict(state["model"])
        except (ValueError, RuntimeError) as exc:
            raise CheckpointError(path, f"its model cannot be rebuilt ({exc})") from exc
        axes = state["plans"].get("mirror_axes", [])
        if tta and not axes:
            raise CheckpointError(path, "comes from a run trained without --mirror-axes; "
                                        "test-time mirroring averages over those axes only")
        device = torch.device(device) if device else default_device()
        return cls(model, state["plans"], device, amp_dtype(amp or default_amp(device)),
                   axes if tta is not False else ())

    def _read(self, paths: Sequence[Path]):
        volumes = [read_image(p) for p in paths]
        first = volumes[0]
        if len(volumes) == 1 and first.data.ndim == 4:
            image = np.ascontiguousarray(np.moveaxis(first.data, 3, 0))
        else:
            for v in volumes:
                if v.data.ndim != 3:
                    raise DataError(v.path, f"has shape {v.shape}; expected one 3D channel")
                if v.shape != first.shape or not np.allclose(v.affine, first.affine, rtol=0.0,
                                                              atol=GRID_ATOL_MM):
                    raise DataError(v.path, f"is not on the grid of {first.path}")
            image = np.stack([v.data for v in volumes])
        if image.shape[0] != self.num_channels:
            raise DataError(first.path, f"has {image.shape[0]} channel(s); the model takes "
                                        f"{self.num_channels} ({self.plans['channels']})")
        return image, first

    @torch.no_grad()
    def network_probabilities(self, image: np.ndarray, reorientation: Reorientation):
        """Softmax (K, *network grid) of a (C, X, Y, Z) HU image on its source grid; with
        mirror axes, the mean of the softmax over every combination of mirrorings along them
        (each mirrored back)."""
        net = normalize(to_network_grid(image, reorientation, self.plans["target_spacing"]),
                        self.stats)
        x = torch.from_numpy(net)[None].to(self.device)
        flips = [[a + 2 for a in axes] for k in range(len(self.mirror_axes) + 1)
                 for axes in itertools.combinations(self.mirror_axes, k)]
        total = None
        for dims in flips:
            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                logits = self.model(x.flip(dims) if dims else x)
            p = torch.softmax(logits.float(), dim=1)
            p = p.flip(dims) if dims else p
            total = p if total is None else total.add_(p)
        return total[0] / len(flips) if len(flips) > 1 else total[0]

    @torch.no_grad()
    def predict_case(self, paths: Sequence[str | PathLike[str]], out: str | PathLike[str],
                     probabilities: str | PathLike[str] | None = None) -> Path:
        """Predict one case from its image file(s) into `out` (and optionally its
        probabilities); returns `out`."""
        paths = [Path(p) for p in paths]
        out = Path(out)
        if out.resolve() in {p.resolve() for p in paths}:
            raise DataError(out, "the prediction would overwrite its own input image")
        image, first = self._read(paths)
        reorientation = Reorientation.of(first.affine, image.shape[1:])
        probs = self.network_probabilities(image, reorientation)
        shape = reorientation.canonical_shape
        keep = None
        if probabilities is not None:
            keep = np.empty((len(self.classes), *shape), dtype=np.float32)
        best_p = best_k = None
        for k in range(len(self.classes)):
            p = probs[k]
            if tuple(p.shape) != shape:
                p = F.interpolate(p[None, None], size=shape, mode="trilinear",
                                  align_corners=False)[0, 0]
            if keep is not None:
                keep[k] = p.cpu().numpy()
            if best_p is None:
                index_dtype = torch.uint8 if len(self.classes) <= 256 else torch.int32
                best_p = p.clone()
                best_k = torch.zeros(shape, dtype=index_dtype, device=p.device)
            else:
                # Strictly greater: ties keep the lower class, as torch.argmax does.
                wins = p > best_p
                best_p = torch.where(wins, p, best_p)
                best_k[wins] = k
        label = self.labels.to_source(reorientation.undo(best_k.cpu().numpy()))
        self.last_empty = not label.any()
        write_like(label, first.affine, first.header, out)
        if keep is not None:
            source = np.ascontiguousarray(np.moveaxis(reorientation.undo(keep), 0, 3))
            write_like(source, first.affine, first.header, probabilities)
            classes = [{"index": i, "name": n, "label_id": int(self.labels.source_ids[i])}
                       for i, n in enumerate(self.classes)]
            Path(probabilities).with_name("classes.json").write_text(
                json.dumps(classes, indent=2) + "\n")
        return out


def predict_paths(checkpoint: str | PathLike[str], input: str | PathLike[str],
                  out_dir: str | PathLike[str], device: str | None = None,
                  amp: str | None = None, probabilities: bool = False,
                  tta: bool | None = None, labels_json: bool = False,
                  note: Callable[[str], None] | None = None) -> list[Path]:
    """Predict every case of `input` (a file or a folder, see `find_cases`) into `out_dir`;
    returns the label maps written. `checkpoint`: a file or a run folder (its best.pt); tta:
    see `Predictor.from_checkpoint`; `labels_json`: also write out_dir/labels.json (label names
    and ids). Files left out and predictions that hold only background are told to `note`."""
    note = note or (lambda message: None)
    predictor = Predictor.from_checkpoint(checkpoint, device, amp, tta)
    out_dir = Path(out_dir)
    written = []
    for name, paths, ending in find_cases(input, note):
        prob_path = out_dir / f"{name}_probabilities{ending}" if probabilities else None
        written.append(predictor.predict_case(paths, out_dir / f"{name}{ending}", prob_path))
        if predictor.last_empty:
            note(f"warning: {written[-1]} holds only background: no "
                 f"{', '.join(predictor.classes[1:])} was found (is the image a CT in HU, "
                 "like the training cases?)")
    if labels_json:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "labels.json").write_text(json.dumps(predictor.label_table(), indent=2)
                                             + "\n")
    return written
