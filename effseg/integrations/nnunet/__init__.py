"""effseg inside nnU-Net v2 (public name: `effseg.nnunet`).

- `trainer`: `nnUNetTrainerEffseg`, nnU-Net's trainer with the plans' network converted by
  `effseg.convert` (checkpoints and state-dict keys unchanged);
- `planner`: `nnUNetPlannerEffseg`, nnU-Net's experiment planner with the memory estimate of each
  network scaled by effseg's measured reduction for it, so the same GPU-memory target buys larger
  patches; `plan_and_preprocess` runs it the way `nnUNetv2_plan_and_preprocess` runs nnU-Net's;
- `memory`: that measurement (`memory_ratio`), exact on any device;
- `EXT_TRAINER_DIR`: the folder to put in `nnUNet_extTrainer` (`python -m effseg nnunet-path`).

This package imports nnU-Net only in its submodules, so the path is known without it.
"""
from __future__ import annotations

from pathlib import Path

EXT_TRAINER_DIR = Path(__file__).resolve().parent / "ext_trainers"
MISSING_NNUNET = ("effseg's nnU-Net integration needs nnU-Net v2 (nnunetv2), which is not "
                  "installed: pip install effseg[nnunet]")


def import_error(exc: ImportError) -> ImportError:
    """The error to raise for `exc`: the install hint when nnunetv2 itself is missing, `exc`
    itself when something inside an installed nnunetv2 failed to import."""
    name = getattr(exc, "name", None) or ""
    if name == "nnunetv2" or name.startswith("nnunetv2."):
        return ImportError(MISSING_NNUNET)
    return exc


__all__ = ["EXT_TRAINER_DIR", "MISSING_NNUNET", "import_error"]
