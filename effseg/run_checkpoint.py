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


def load_checkpoint(path: str | PathLike[str]) -> dict:
    """Read a checkpoint with `weights_only=True`, tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, f"refused: it holds objects that a weights-only load does "
                                    f"not allow, so it is no effseg checkpoint ({exc})") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(path, f"cannot be read as a torch checkpoint "
                                    f"({type(exc).__name__}: {exc})") from exc
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
