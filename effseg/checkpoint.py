"""`effseg.checkpoint`: activation checkpointing that is safe with batch normalization.

Stock `torch.utils.checkpoint` runs the forward of a region twice, and a batch norm inside it
updates its running statistics twice (pytorch/pytorch#96136). Here:
- effseg norms (and recomputing blocks) inside the region record their batch statistics in the
  forward pass and replay them in the recomputation: no second reduction, no second update;
- stock norms (`nn.BatchNorm*d`, `nn.InstanceNorm*d` with running statistics) recompute their
  batch statistics, but their running statistics and `num_batches_tracked` are restored after the
  recomputation, so they are updated exactly once;
- the RNG state is preserved (dropout draws the same mask), as in torch.utils.checkpoint.

Same call shape as `torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from .ops import replay


@contextmanager
def _running_stats_restored():
    """Snapshots the running statistics of every norm reached by a module call inside the block
    (the module's own or its submodules') and puts them back at the end."""
    saved: dict[int, tuple[_NormBase, list[torch.Tensor]]] = {}

    def snapshot(module, args):
        for m in module.modules():
            if isinstance(m, _NormBase) and m.track_running_stats and id(m) not in saved:
                bufs = [m.running_mean, m.running_var, m.num_batches_tracked]
                saved[id(m)] = (m, [b.clone() for b in bufs])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(snapshot)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for m, (rm, rv, nbt) in saved.values():
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                m.num_batches_tracked.copy_(nbt)


@contextmanager
def _recompute_context(tape: replay.StatsTape):
    with replay.replaying(tape), _running_stats_restored():
        yield


def checkpoint(function: Callable[..., Any], *args, preserve_rng_state: bool = True,
               **kwargs) -> Any:
    """Runs `function(*args, **kwargs)` keeping only its inputs for backward; backward runs it
    again. Batch statistics are replayed, running statistics updated once (module docstring)."""
    tape = replay.StatsTape()

    def contexts():
        return replay.recording(tape), _recompute_context(tape)

    return _torch_checkpoint(function, *args, use_reentrant=False,
                             preserve_rng_state=preserve_rng_state, context_fn=contexts,
                             **kwargs)
