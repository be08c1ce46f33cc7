"""Scoring predicted label maps against references (`python -m effseg evaluate`).

Pairs: predictions and references matched by case id (the file name without its NIfTI ending and
nnU-Net's `_0000` channel suffix), so `.nii` meets `.nii.gz` and `case_0000` meets `case`. Only
predicted cases are scored; references without a prediction (and predictions without a
reference) are left out and named in a note. Both are read by the data layer (`read_labels`) and
must lie on the same grid: same shape, affines equal to 1 micrometre.

Labels: given as name -> id (e.g. from a dataset.json), exactly those are scored, present or not;
given as two label tables (the predictions' labels.json, written by `predict --labels-json`, and
the references' dataset.json), labels are matched by name, so liver = 1 in the predictions meets
liver = 5 in a TotalSegmentator reference; otherwise every non-zero id found in any reference or
prediction, named `label_{id}`.

Per case and label: Dice and HD95 in mm, measured with the reference's voxel spacing
(`effseg.pipeline.metrics`, which documents the rules: both empty gives NaN for both metrics, one empty
gives Dice 0 and HD95 inf), and both voxel counts. The CSV has one row per case and label, then
one `mean` row per label (mean over cases skipping NaN, as nnU-Net averages), then one `median`
row per label; `format_table` shows both.

Refused, as `DataError` naming the file: a missing prediction, a reference folder without NIfTI
files, grids that differ, unreadable files; a label subset naming an undeclared label.
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from .data import GRID_ATOL_MM, DataError, parse_labels, read_labels, voxel_spacing
from .data.nifti import NIFTI_ENDINGS
from .metrics import dice, hd95

FIELDS = ("case", "label", "label_id", "pred_label_id", "dice", "hd95_mm", "ref_voxels",
          "pred_voxels")
_CHANNEL_SUFFIX = re.compile(r"(.+)_(\d{4})$")


def case_id(path: Path) -> str:
    """A file's case id: its name without the NIfTI ending and nnU-Net's channel suffix
    (`liver_003_0000.nii.gz` and `liver_003.nii` are case `liver_003`)."""
    stem = next(path.name[: -len(e)] for e in NIFTI_ENDINGS if path.name.endswith(e))
    match = _CHANNEL_SUFFIX.match(stem)
    return match.group(1) if match else stem


def _nifti_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and any(
                p.name.endswith(e) for e in NIFTI_ENDINGS) and "_probabilities." not in p.name:
            case = case_id(p)
            if case in files:
                raise DataError(p, f"is case {case!r} too, like {files[case].name}")
            files[case] = p
    return files


def find_pairs(pred_dir: str | PathLike[str], ref_dir: str | PathLike[str],
               note: Callable[[str], None] | None = None) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) for every predicted case that has a reference, matched by
    case id (see `case_id`). References without a prediction and predictions without a
    reference are told to `note` and left out."""
    note = note or (lambda message: None)
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise DataError(folder, "folder not found")
    refs, preds = _nifti_files(ref_dir), _nifti_files(pred_dir)
    if not refs:
        raise DataError(ref_dir, "holds no NIfTI reference files")
    if not preds:
        raise DataError(pred_dir, "holds no NIfTI predictions")
    common = sorted(set(refs) & set(preds))
    if not common:
        raise DataError(pred_dir, f"no prediction matches a reference of {ref_dir} by case id "
                                  f"(predictions: {_some(preds)}; references: {_some(refs)})")
    unscored = sorted(set(refs) - set(preds))
    if unscored:
        note(f"{len(unscored)} reference(s) without a prediction left out: {_some(unscored)}")
    orphans = sorted(set(preds) - set(refs))
    if orphans:
        note(f"{len(orphans)} prediction(s) without a reference left out: {_some(orphans)}")
    return [(case, preds[case], refs[case]) for case in common]


def _some(names, shown: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more"
                                        if len(names) > shown else "")


def read_label_table(path: str | PathLike[str]) -> dict[str, int]:
    """name -> id of a dataset.json or labels.json (a `labels` object), or of the folder
    holding a dataset.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise DataError(path, "label table not found (a dataset.json or labels.json)")
    try:
        return parse_labels(json.loads(path.read_text()).get("labels"), path)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise DataError(path, f"is not a dataset.json/labels.json with a 'labels' object "
                              f"({exc})") from exc


def dataset_labels(path: str | PathLike[str],
                   names: Sequence[str] | None = None) -> dict[str, int]:
    """Foreground labels (name -> id) of a dataset.json (or of the dataset folder holding one),
    optionally only `names`."""
    foreground = {n: i for n, i in read_label_table(path).items() if i != 0}
    return _subset(foreground, names, path)


def _subset(labels: dict, names: Sequence[str] | None, source) -> dict:
    if names is None:
        return labels
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise DataError(source, f"labels {unknown} are not declared foreground labels; "
                                f"declared: {sorted(labels)}")
    return {n: labels[n] for n in names}


def matched_labels(pred_table: str | PathLike[str] | None,
                   ref_table: str | PathLike[str] | None,
                   names: Sequence[str] | None = None,
                   note: Callable[[str], None] | None = None
                   ) -> dict[str, tuple[int, int]] | None:
    """name -> (id in the predictions, id in the references), from the two sides' label
    tables: matched by name when both are given (names on one side only are told to `note`),
    the same ids on both sides when one is; None (every id found) when neither is."""
    note = note or (lambda message: None)
    if pred_table is None and ref_table is None:
        return None
    if pred_table is None or ref_table is None or Path(pred_table) == Path(ref_table):
        table = dataset_labels(pred_table if ref_table is None else ref_table, names)
        return {n: (i, i) for n, i in table.items()}
    pred = dataset_labels(pred_table)
    ref = dataset_labels(ref_table)
    both = {n: (pred[n], ref[n]) for n in ref if n in pred}
    if not both:
        raise DataError(pred_table, f"no label name in common with {ref_table} (predictions: "
                                    f"{_some(pred)}; references: {_some(ref)})")
    if names is None:
        for side, table in (("predictions", pred), ("references", ref)):
            alone = sorted(set(table) - set(both))
            if alone:
                note(f"label(s) only in the {side}' table, not scored: {_some(alone)}")
    return _subset(both, names, f"{pred_table} and {ref_table}")


def evaluate_files(pairs: Sequence[tuple[str, Path, Path]],
                   labels: Mapping[str, int | tuple[int, int]] | None = None) -> list[dict]:
    """One row per case and label (see the module docstring). `labels`: name -> id, or name ->
    (id in the predictions, id in the references) when the two label tables differ."""
    per_case = []
    found: set[int] = set()
    pairs_of = None if labels is None else {
        n: (v, v) if isinstance(v, int) else tuple(v) for n, v in labels.items()}
    for case, pred_path, ref_path in pairs:
        ref, pred = read_labels(ref_path), read_labels(pred_path)
        if pred.shape != ref.shape or not np.allclose(pred.affine, ref.affine, rtol=0.0,
                                                      atol=GRID_ATOL_MM):
            raise DataError(pred_path, f"grid (shape {pred.shape}) differs from the reference "
                                       f"{ref_path} (shape {ref.shape}) or its affine")
        ids = sorted(pairs_of.values(), key=lambda v: v[1]) if pairs_of is not None else [
            (int(i), int(i)) for i in np.union1d(np.unique(ref.data), np.unique(pred.data))
            if i != 0]
        found.update(r for _, r in ids)
        spacing = voxel_spacing(ref.affine)
        scores = {}
        for pred_id, ref_id in ids:
            p, r = pred.data == pred_id, ref.data == ref_id
            scores[ref_id] = {"dice": dice(p, r), "hd95_mm": hd95(p, r, spacing),
                              "ref_voxels": int(r.sum()), "pred_voxels": int(p.sum()),
                              "pred_label_id": pred_id}
        per_case.append((case, scores))
    names = {r: n for n, (_, r) in pairs_of.items()} if pairs_of is not None else {
        i: f"label_{i}" for i in found}
    pred_ids = {r: p for p, r in pairs_of.values()} if pairs_of is not None else {
        i: i for i in found}
    rows = []
    for case, scores in per_case:
        for ident in sorted(names):
            absent = {"dice": math.nan, "hd95_mm": math.nan, "ref_voxels": 0, "pred_voxels": 0,
                      "pred_label_id": pred_ids[ident]}
            rows.append({"case": case, "label": names[ident], "label_id": ident,
                         **scores.get(ident, absent)})
    return rows


def label_summaries(rows: Sequence[dict]) -> list[dict]:
    """Per label: a `mean` and a `median` row of Dice and HD95 over the cases where they are not
    NaN (an infinite HD95, one side empty, makes the mean infinite; the median shows the
    typical case)."""
    out = []
    for stat, fn in (("mean", np.mean), ("median", np.median)):
        for ident in sorted({r["label_id"] for r in rows}):
            mine = [r for r in rows if r["label_id"] == ident]
            entry = {"case": stat, "label": mine[0]["label"], "label_id": ident,
                     "pred_label_id": mine[0]["pred_label_id"]}
            for key in ("dice", "hd95_mm"):
                values = np.array([r[key] for r in mine], dtype=np.float64)
                values = values[~np.isnan(values)]
                entry[key] = float(fn(values)) if values.size else math.nan
            entry["cases"] = int(sum(not math.isnan(r["dice"]) for r in mine))
            entry["ref_voxels"] = sum(r["ref_voxels"] for r in mine)
            entry["pred_voxels"] = sum(r["pred_voxels"] for r in mine)
            out.append(entry)
    return out


def label_means(rows: Sequence[dict]) -> list[dict]:
    """Per label: mean Dice and HD95 over the cases where they are not NaN."""
    return [r for r in label_summaries(rows) if r["case"] == "mean"]


def write_csv(rows: Sequence[dict], path: str | PathLike[str]) -> Path:
    """The case rows, then the per-label mean rows, then the per-label median rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in [*rows, *label_summaries(rows)]:
            writer.writerow({**row, "dice": _number(row["dice"]),
                             "hd95_mm": _number(row["hd95_mm"])})
    return path


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.6g}")


def format_table(rows: Sequence[dict]) -> str:
    """Per-label mean and median as an aligned text table."""
    summaries = label_summaries(rows)
    means = [m for m in summaries if m["case"] == "mean"]
    medians = {m["label_id"]: m for m in summaries if m["case"] == "median"}
    width = max([len("label")] + [len(m["label"]) for m in means])
    lines = [f"{'label':<{width}}  {'id':>5}  {'cases':>5}  {'Dice mean':>9}  {'median':>6}  "
             f"{'HD95 mm mean':>12}  {'median':>6}"]
    for m in means:
        med = medians[m["label_id"]]
        ident = str(m["label_id"]) if m["pred_label_id"] == m["label_id"] else (
            f"{m['pred_label_id']}->{m['label_id']}")
        lines.append(f"{m['label']:<{width}}  {ident:>5}  {m['cases']:>5}  {m['dice']:>9.4f}  "
                     f"{med['dice']:>6.4f}  {m['hd95_mm']:>12.2f}  {med['hd95_mm']:>6.2f}")
    return "\n".join(lines)
