"""effseg: memory-efficient layers for whole-volume 3D segmentation in PyTorch.

- `effseg.nn`: in-place activated normalization modules (`InPlaceABN`, `InPlaceAIN`,
  `InPlaceAGN`, and `InPlaceABNSync` with `convert_sync` for data-parallel training; LeakyReLU,
  ELU, PReLU or identity fused), the `ConvNormAct3d` unit and the recomputing
  `RecomputeBlock3d` / `DecoderBlock3d`;
- `effseg.models`: `FullVolumeFCN` and its stock twin `StockUNet3d`;
- `effseg.checkpoint`: activation checkpointing that is safe with batch norm;
- `effseg.convert`: fuses the norm + activation pairs of an existing network (MONAI's included)
  into the in-place modules; `effseg.monai.register()`: effseg norms in MONAI's Norm factory;
- `effseg.nnunet` (not imported here; `pip install effseg[nnunet]`): `nnUNetTrainerEffseg` and
  `nnUNetPlannerEffseg` for nnU-Net v2;
- `effseg.functional`: the same as functions;
- `effseg.ops`: the autograd binding of `torch.ops.effseg.*` and the pure-PyTorch references.

The package's folders are its layers, each importing only the layers to its left:
`effseg.ops` (autograd over the compiled kernels) <- `effseg.nn`, `effseg.models`, losses,
functional, checkpoint, memory (the library) <- `effseg.integrations` (convert, MONAI) <-
`effseg.pipeline` (datasets, training, inference, evaluation, planning, `python -m effseg`).
"""
import sys

from . import functional, losses, memory, models, nn, ops
from .checkpoint import checkpoint
from .integrations import convert as _convert_module
from .integrations import monai
from .integrations.convert import convert
from .ops import HAVE_EXTENSION

# The integrations' public module paths: `effseg.convert` (a module, and the function of that
# name as the package attribute) and `effseg.monai`.
sys.modules[f"{__name__}.convert"] = _convert_module
sys.modules[f"{__name__}.monai"] = monai

try:
    from ._build_config import VERSION as __version__
except ImportError:  # an unbuilt source tree
    __version__ = "0.1.0"

__all__ = ["HAVE_EXTENSION", "checkpoint", "convert", "functional", "losses", "memory", "models",
           "monai", "nn", "ops", "__version__"]
