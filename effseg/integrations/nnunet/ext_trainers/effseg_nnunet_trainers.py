"""What nnU-Net finds in the folder `python -m effseg nnunet-path` prints (nnUNet_extTrainer).

nnU-Net imports every module of that folder as a top-level module and looks up the trainer by
name; re-exporting the classes keeps one class object per trainer (the one in effseg's package),
so checkpoints and isinstance checks agree whichever way the trainer was found.
"""
from effseg.integrations.nnunet.trainer import nnUNetTrainerEffseg, nnUNetTrainerEffsegFused

__all__ = ["nnUNetTrainerEffseg", "nnUNetTrainerEffsegFused"]
