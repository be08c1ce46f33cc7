"""effseg: memory-efficient layers for whole-volume 3D segmentation in PyTorch.

- `effseg.nn`: in-place activated normalization modules (`InPlaceABN`, `InPlaceAIN`);
- `effseg.functional`: the same as functions;
- `effseg.ops`: the autograd binding of `torch.ops.effseg.*` and the pure-PyTorch references.
"""
from . import functional, nn, ops
from .ops import HAVE_EXTENSION

try:
    from ._build_config import VERSION as __version__
except ImportError:  # an unbuilt source tree
    __version__ = "0.1.0"

__all__ = ["HAVE_EXTENSION", "functional", "nn", "ops", "__version__"]
