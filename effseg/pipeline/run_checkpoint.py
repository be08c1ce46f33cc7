"""Training checkpoints on disk (`last.pt`, `best.pt`): atomic writes, weights-only reads.

A checkpoint is a dict of tensors and primitive containers (dict, list, str, int, float, bool,
None) only, so it is read with `torch.load(..., weights_only=True)`: loading a checkpoint cannot
run code. `load_checkpoint` refuses anything else (a file holding a pickled object, or not a torch
file) with a `CheckpointError` naming the file, and refuses a dict that is not an effseg training
checkpoint (its `format` field).

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
target (`os.replace`), so a crash or Ctrl-C during a write leaves the previous checkpoint whole.

The random number generators (python, numpy's global one, torch's CPU one and every CUDA
device's) are captured as tensors and lists by `rng_state` and restored by `set_rng_state`.
"""
from __future__ import annotations

import os
import pickle
import random
from os import PathLike
from pathlib import Path

import numpy as np
import torch

FORMAT = "effseg-train-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file."""

    def __init__(self, path: str | PathLike[str], problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


def save_checkpoint(state: dict, path: str | PathLike[str]) -> Path:
    """Write `state` to `path` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint(path: str | PathLike[str]) -> Path:
    """A checkpoint file, or a run folder's best.pt (else its last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(path, "is a folder without best.pt or last.pt (give a run folder "
                                    "or a checkpoint file)")
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    return path


def _what_file(path: Path) -> str:
    """What a file that is no torch checkpoint looks like, for the error message."""
    with open(path, "rb") as f:
        head = f.read(352)
    if head[:2] == b"\x1f\x8b":
        return "a gzip file (a .nii.gz image?)"
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI image"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not a torch file"


def load_checkpoint(path: str | PathLike[str]) -> dict:
    """Read a checkpoint (a file, or a run folder: its best.pt, else last.pt) with
    `weights_only=True`, tensors on the CPU."""
    path = resolve_checkpoint(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    # torch.save writes a zip archive (legacy files: a pickle); anything else is no checkpoint,
    # and torch's own message would suggest an unsafe full unpickling of it.
    if magic != b"PK" and magic[:1] != b"\x80":
        raise CheckpointError(path, f"is not an effseg checkpoint: {_what_file(path)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, "is not an effseg checkpoint: it holds Python objects that "
                                    "a weights-only load refuses") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"cannot be read as a torch checkpoint (truncated or "
                                    f"corrupt: {first[:120]})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(path, f"is not an effseg training checkpoint (no format "
                                    f"{FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(path, f"has checkpoint version {state.get('version')!r}; this "
                                    f"effseg reads version {VERSION}")
    return state


def rng_state() -> dict:
    """Every global random generator's state, as tensors and primitives."""
    numpy_state = np.random.get_state(legacy=False)
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "python": [python_version, list(python_internal), python_gauss],
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured; CUDA states only where as many devices are visible."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy["key"].numpy().astype(np.uint32),
                                   "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
