"""Whole-volume segmentation networks: `FullVolumeFCN` (effseg blocks) and `StockUNet3d` (the
same topology from stock layers, the baseline of every memory ratio)."""
from .fcn import FullVolumeFCN
from .stock import StockUNet3d

__all__ = ["FullVolumeFCN", "StockUNet3d"]
