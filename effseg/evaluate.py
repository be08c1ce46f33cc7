"""Scoring predicted label maps against references (`python -m effseg evaluate`).

Pairs: every NIfTI file of the reference folder with the file of the same name in the prediction
folder (predictions without a reference are ignored). Both are read by the data layer
(`read_labels`) and must lie on the same grid: same shape, affines equal to 1 micrometre.

Labels: given as name -> id (e.g. from a dataset.json), exactly those are scored, present or not;
otherwise every non-zero id found in any reference or prediction, named `label_{id}`.

Per case and label: Dice and HD95 in mm, measured with the reference's voxel spacing
(`effseg.metrics`, which documents the rules: both empty gives NaN for both metrics, one empty
gives Dice 0 and HD95 inf), and both voxel counts. The CSV has one row per case and label, then
one `mean` row per label (mean over cases skipping NaN, as nnU-Net averages); `format_table` shows
those means.

Refused, as `DataError` naming the file: a missing prediction, a reference folder without NIfTI
files, grids that differ, unreadable files; a label subset naming an undeclared label.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from .data import GRID_ATOL_MM, DataError, parse_labels, read_labels, voxel_spacing
from .data.nifti import NIFTI_ENDINGS
from .metrics import dice, hd95

FIELDS = ("case", "label", "label_id", "dice", "hd95_mm", "ref_voxels", "pred_voxels")


def find_pairs(pred_dir: str | PathLike[str],
               ref_dir: str | PathLike[str]) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) for every reference file."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise DataError(folder, "folder not found")
    refs = sorted(p for p in ref_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and any(p.name.endswith(e) for e in NIFTI_ENDINGS))
    if not refs:
        raise DataError(ref_dir, "holds no NIfTI reference files")
    pairs = []
    for ref in refs:
        pred = pred_dir / ref.name
        if not pred.is_file():
            raise DataError(pred, f"prediction for reference {ref} not found")
        case = next(ref.name[: -len(e)] for e in NIFTI_ENDINGS if ref.name.endswith(e))
        pairs.append((case, pred, ref))
    return pairs


def dataset_labels(path: str | PathLike[str],
                   names: Sequence[str] | None = None) -> dict[str, int]:
    """Foreground labels (name -> id) of a dataset.json (or of the dataset folder holding one),
    optionally only `names`."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise DataError(path, "dataset.json not found")
    try:
        declared = parse_labels(json.loads(path.read_text()).get("labels"), path)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise DataError(path, f"is not a dataset.json with a 'labels' object ({exc})") from exc
    foreground = {name: ident for name, ident in declared.items() if ident != 0}
    if names is None:
        return foreground
    unknown = [n for n in names if n not in foreground]
    if unknown:
        raise DataError(path, f"labels {unknown} are not declared foreground labels; declared: "
                              f"{sorted(foreground)}")
    return {n: foreground[n] for n in names}


def evaluate_files(pairs: Sequence[tuple[str, Path, Path]],
                   labels: Mapping[str, int] | None = None) -> list[dict]:
    """One row per case and label (see the module docstring)."""
    per_case = []
    found: set[int] = set()
    for case, pred_path, ref_path in pairs:
        ref, pred = read_labels(ref_path), read_labels(pred_path)
        if pred.shape != ref.shape or not np.allclose(pred.affine, ref.affine, rtol=0.0,
                                                      atol=GRID_ATOL_MM):
            raise DataError(pred_path, f"grid (shape {pred.shape}) differs from the reference "
                                       f"{ref_path} (shape {ref.shape}) or its affine")
        ids = sorted(labels.values()) if labels is not None else sorted(
            int(i) for i in np.union1d(np.unique(ref.data), np.unique(pred.data)) if i != 0)
        found.update(ids)
        spacing = voxel_spacing(ref.affine)
        scores = {}
        for ident in ids:
            p, r = pred.data == ident, ref.data == ident
            scores[ident] = {"dice": dice(p, r), "hd95_mm": hd95(p, r, spacing),
                             "ref_voxels": int(r.sum()), "pred_voxels": int(p.sum())}
        per_case.append((case, scores))
    names = dict((v, k) for k, v in labels.items()) if labels is not None else {
        i: f"label_{i}" for i in found}
    absent = {"dice": math.nan, "hd95_mm": math.nan, "ref_voxels": 0, "pred_voxels": 0}
    rows = []
    for case, scores in per_case:
        for ident in sorted(names):
            rows.append({"case": case, "label": names[ident], "label_id": ident,
                         **scores.get(ident, absent)})
    return rows


def label_means(rows: Sequence[dict]) -> list[dict]:
    """Per label: mean Dice and HD95 over the cases where they are not NaN."""
    means = []
    for ident in sorted({r["label_id"] for r in rows}):
        mine = [r for r in rows if r["label_id"] == ident]
        entry = {"case": "mean", "label": mine[0]["label"], "label_id": ident}
        for key in ("dice", "hd95_mm"):
            values = np.array([r[key] for r in mine], dtype=np.float64)
            values = values[~np.isnan(values)]
            entry[key] = float(values.mean()) if values.size else math.nan
        entry["cases"] = int(sum(not math.isnan(r["dice"]) for r in mine))
        entry["ref_voxels"] = sum(r["ref_voxels"] for r in mine)
        entry["pred_voxels"] = sum(r["pred_voxels"] for r in mine)
        means.append(entry)
    return means


def write_csv(rows: Sequence[dict], path: str | PathLike[str]) -> Path:
    """The case rows, then the per-label mean rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in [*rows, *label_means(rows)]:
            writer.writerow({**row, "dice": _number(row["dice"]),
                             "hd95_mm": _number(row["hd95_mm"])})
    return path


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.6g}")


def format_table(rows: Sequence[dict]) -> str:
    """Per-label means as an aligned text table."""
    means = label_means(rows)
    width = max([len("label")] + [len(m["label"]) for m in means])
    lines = [f"{'label':<{width}}  {'id':>5}  {'cases':>5}  {'Dice':>6}  {'HD95 mm':>8}"]
    for m in means:
        lines.append(f"{m['label']:<{width}}  {m['label_id']:>5}  {m['cases']:>5}  "
                     f"{m['dice']:>6.4f}  {m['hd95_mm']:>8.2f}")
    return "\n".join(lines)
