"""Declared labels of a dataset, and the mapping from stored label ids to training classes.

dataset.json declares its labels either as name -> id (nnU-Net v2: `{"background": 0, "liver": 1}`)
or as id -> name (Medical Segmentation Decathlon: `{"0": "background", "1": "liver"}`); both are
read into one name -> id mapping. Ids may be sparse (TotalSegmentator uses 1..117 with gaps).

A `LabelMap` turns stored ids into consecutive training ids 0..k: either every declared label in
id order, or a chosen subset by name (e.g. liver, spleen, kidney_left of 60 labels become 1, 2, 3
and everything else background). It also maps training ids back to stored ids for predictions.

Refused: region-based (list-valued) labels, ids that are not non-negative integers, a name or id
declared twice, no background id 0, a subset naming an undeclared or repeated label, and label maps
holding values that were not declared.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike

import numpy as np

from .errors import DataError


def _as_id(value: object, source, name: str) -> int:
    if isinstance(value, bool):
        raise DataError(source, f"label {name!r} has id {value!r}; expected a non-negative integer")
    if isinstance(value, int):
        ident = value
    elif isinstance(value, str) and value.strip().isdigit():
        ident = int(value)
    elif isinstance(value, (list, tuple)):
        raise DataError(source, f"label {name!r} is region-based ({value!r}); only one id per "
                                "label is supported")
    else:
        raise DataError(source, f"label {name!r} has id {value!r}; expected a non-negative integer")
    if ident < 0:
        raise DataError(source, f"label {name!r} has negative id {ident}")
    return ident


def parse_labels(raw: object, source: str | PathLike[str]) -> dict[str, int]:
    """The `labels` field of dataset.json as name -> id, sorted by id; `source` names the file."""
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(source, f"'labels' must be a non-empty mapping, got {raw!r}")
    keys_are_ids = all(isinstance(k, str) and k.strip().isdigit() for k in raw)
    values_are_names = all(isinstance(v, str) and not v.strip().isdigit() for v in raw.values())
    if keys_are_ids and values_are_names:
        pairs = [(str(name), _as_id(key, source, str(name))) for key, name in raw.items()]
    else:
        pairs = [(str(name), _as_id(value, source, str(name))) for name, value in raw.items()]
    names: dict[str, int] = {}
    ids: dict[int, str] = {}
    for name, ident in pairs:
        if name in names:
            raise DataError(source, f"label name {name!r} is declared twice")
        if ident in ids:
            raise DataError(source, f"labels {ids[ident]!r} and {name!r} share id {ident}")
        names[name] = ident
        ids[ident] = name
    if 0 not in ids:
        raise DataError(source, "labels declare no background (id 0)")
    return dict(sorted(names.items(), key=lambda item: item[1]))


class LabelMap:
    """Stored label ids -> training class ids 0..k (0 is background), and back.

    `declared` is dataset.json's name -> id mapping; `select` names the foreground classes to
    train on, in the order of their training ids (None: every declared label, in id order).
    """

    def __init__(self, declared: Mapping[str, int], select: Sequence[str] | None = None,
                 source: str | PathLike[str] = "labels"):
        self.source = source
        self.declared = dict(declared)
        background = next(name for name, ident in self.declared.items() if ident == 0)
        if select is None:
            by_id = sorted(self.declared.items(), key=lambda item: item[1])
            foreground = [name for name, _ in by_id if name != background]
        else:
            if isinstance(select, str):
                raise DataError(source, f"classes must be a sequence of names, got the string "
                                        f"{select!r}")
            foreground = list(select)
            unknown = [n for n in foreground if n not in self.declared]
            if unknown:
                raise DataError(source, f"classes {unknown} are not declared; declared labels: "
                                        f"{sorted(self.declared)}")
            repeated = sorted({n for n in foreground if foreground.count(n) > 1})
            if repeated:
                raise DataError(source, f"classes {repeated} are listed more than once")
            if background in foreground:
                raise DataError(source, f"{background!r} is the background (id 0); it is always "
                                        "class 0 and cannot be selected")
        self.classes: tuple[str, ...] = (background, *foreground)
        self.source_ids = np.array([self.declared[n] for n in self.classes], dtype=np.int64)
        self.dtype = np.dtype(np.uint8 if len(self.classes) < 255 else np.uint16)
        # The table's last value marks ids that are not declared at all; declared but unselected
        # ids map to background.
        self._undeclared = np.iinfo(self.dtype).max
        self._lut = np.full(max(self.declared.values()) + 1, self._undeclared, dtype=self.dtype)
        self._lut[list(self.declared.values())] = 0
        self._lut[self.source_ids] = np.arange(len(self.classes), dtype=self.dtype)

    @property
    def num_classes(self) -> int:
        """Number of training classes, background included."""
        return len(self.classes)

    def to_training(self, labels: np.ndarray, path: str | PathLike[str]) -> np.ndarray:
        """Stored ids -> training ids; `path` names the file in the error for undeclared values."""
        if labels.dtype.kind not in "iu":
            raise ValueError(f"label maps must hold integers, got {labels.dtype}")
        if labels.size == 0:
            return np.zeros(labels.shape, dtype=self.dtype)
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= len(self._lut):
            self._raise_undeclared(labels[(labels < 0) | (labels >= len(self._lut))], path)
        mapped = self._lut[labels]
        undeclared = mapped == self._undeclared
        if undeclared.any():
            self._raise_undeclared(labels[undeclared], path)
        return mapped

    def to_source(self, classes: np.ndarray) -> np.ndarray:
        """Training ids (e.g. a prediction's argmax) -> the dataset's stored ids."""
        if classes.size and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes - 1}], got "
                             f"[{int(classes.min())}, {int(classes.max())}]")
        out = self.source_ids[classes]
        return out.astype(np.uint8 if self.source_ids.max() < 256 else np.uint16)

    def _raise_undeclared(self, values: np.ndarray, path) -> None:
        bad = np.unique(values)
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise DataError(path, f"label values {{{shown}}} are not declared in {self.source} "
                              f"(declared ids: {sorted(self.declared.values())})")
