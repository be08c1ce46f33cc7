"""Modules to import into your own networks."""
from .blocks import RecomputeBlock3d
from .conv_norm_act import ConvNormAct3d
from .decoder import DecoderBlock3d
from .norm_act import InPlaceABN, InPlaceABNSync, InPlaceAGN, InPlaceAIN
from .sync import convert_sync

__all__ = ["ConvNormAct3d", "DecoderBlock3d", "InPlaceABN", "InPlaceABNSync", "InPlaceAGN",
           "InPlaceAIN", "RecomputeBlock3d", "convert_sync"]
