"""effseg ops: autograd Functions around `torch.ops.effseg.*`, their fake kernels and their
pure-PyTorch references (`effseg.ops.reference`)."""
from . import reference
from ._library import HAVE_EXTENSION, OP_NAMES, has_kernel, load_error, op
from .norm_act import NormActFunction, norm_act, update_running_stats

__all__ = [
    "HAVE_EXTENSION",
    "OP_NAMES",
    "NormActFunction",
    "has_kernel",
    "load_error",
    "norm_act",
    "op",
    "reference",
    "update_running_stats",
]
