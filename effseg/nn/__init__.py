"""Modules to import into your own networks."""
from .norm_act import InPlaceABN, InPlaceAIN

__all__ = ["InPlaceABN", "InPlaceAIN"]
