"""effseg for nnU-Net v2 users: `nnUNetTrainerEffseg`, `nnUNetPlannerEffseg`.

A thin public name for `effseg.integrations.nnunet`; importing it without nnU-Net v2 installed
raises an ImportError that says `pip install effseg[nnunet]`. See docs/networks.md (nnU-Net v2).
"""
from .integrations.nnunet import EXT_TRAINER_DIR, import_error

try:
    from .integrations.nnunet.memory import MemoryRatio, memory_ratio
    from .integrations.nnunet.planner import nnUNetPlannerEffseg, plan_and_preprocess
    from .integrations.nnunet.trainer import nnUNetTrainerEffseg
except ImportError as exc:
    raise import_error(exc) from exc

__all__ = ["EXT_TRAINER_DIR", "MemoryRatio", "memory_ratio", "nnUNetPlannerEffseg",
           "nnUNetTrainerEffseg", "plan_and_preprocess"]
