"""Turning a model's batch norms into synchronized ones, like
`nn.SyncBatchNorm.convert_sync_batchnorm`, for data-parallel training across processes.

- `InPlaceABN` -> `InPlaceABNSync` (the same parameter and buffer tensors, activation and
  settings); an `InPlaceABNSync` is given the new process group;
- a stock batch norm (`nn.BatchNorm{1,2,3}d`) -> `nn.SyncBatchNorm` (torch's own converter); to
  fuse stock batch norms with their activations first, use `effseg.convert(model, sync=True)`,
  which fuses where that is safe and then calls this;
- instance norms (`InPlaceAIN`, `nn.InstanceNorm*`) stay: their statistics are per sample, the
  same on one rank as on many.

Blocks built from effseg norms (`RecomputeBlock3d`, `DecoderBlock3d`, `FullVolumeFCN`) read their
norms at each call, so a converted model recomputes with the global statistics it recorded.
"""
from __future__ import annotations

from torch import nn

from .norm_act import InPlaceABN, InPlaceABNSync, InPlaceAIN


def _synchronized(norm: InPlaceABN, process_group) -> InPlaceABNSync:
    new = InPlaceABNSync(norm.num_features, norm.eps, norm.momentum, norm.affine,
                         norm.track_running_stats, norm.activation, norm.activation_param,
                         process_group, device="meta")
    # The same tensors, not copies: an optimizer that already holds the parameters keeps
    # working, and the statistics go on from where they were.
    for name, param in norm.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buffer in norm.named_buffers(recurse=False):
        setattr(new, name, buffer)
    if norm._slope_source is not None:
        new.fuse_prelu(norm._slope_source)
    new.train(norm.training)
    return new


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """Returns `module` with its batch norms synchronized over `process_group` (None: the
    default group); converted in place where the module is a container, like torch's converter
    (the returned object is the one to use when `module` itself is a norm)."""
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, InPlaceABN) and not isinstance(module, InPlaceAIN):
        return _synchronized(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, nn.SyncBatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, nn.SyncBatchNorm):
        module.process_group = process_group
        return module
    for name, child in module.named_children():
        new = _convert(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module

