"""The built-in phantom dataset, generated once into a cache folder (what `train` uses when no
`--data` is given).

The folder is `$EFFSEG_CACHE` (default `$XDG_CACHE_HOME/effseg`, else `~/.cache/effseg`) /
`phantom-{cases}x{X}x{Y}x{Z}-{sx}x{sy}x{sz}mm-seed{seed}`: the name holds every parameter, so
two settings never share a folder, and a folder that exists is complete: generation writes into a
temporary sibling and renames it into place at the end, so an interrupted generation, or two
running at once, never leave half a dataset behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .data import make_phantom_dataset

NUM_CASES = 8
SHAPE = (96, 96, 64)
SPACING = (3.0, 3.0, 3.0)
SEED = 0


def cache_root() -> Path:
    """Where effseg caches generated data."""
    if os.environ.get("EFFSEG_CACHE"):
        return Path(os.environ["EFFSEG_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "effseg"


def phantom_folder(num_cases: int = NUM_CASES, shape: Sequence[int] = SHAPE,
                   spacing: Sequence[float] = SPACING, seed: int = SEED) -> Path:
    """The cache folder of a phantom dataset with these parameters (it may not exist yet)."""
    dims = "x".join(str(int(n)) for n in shape)
    mm = "x".join(f"{float(s):g}" for s in spacing)
    return cache_root() / f"phantom-{num_cases}x{dims}-{mm}mm-seed{seed}"


def phantom_dataset(num_cases: int = NUM_CASES, shape: Sequence[int] = SHAPE,
                    spacing: Sequence[float] = SPACING, seed: int = SEED) -> Path:
    """The phantom dataset's folder, generated on first use."""
    final = phantom_folder(num_cases, shape, spacing, seed)
    if (final / "dataset.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        make_phantom_dataset(work, num_cases, shape, spacing, seed)
        try:
            os.rename(work, final)
        except OSError:
            # Another process finished the same dataset first; theirs is identical.
            if not (final / "dataset.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
