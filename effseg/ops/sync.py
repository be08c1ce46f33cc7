"""Batch-norm statistics and backward sums combined across the ranks of a process group.

Forward: each rank reduces its own batch (`norm_stats`: per-channel mean and biased variance of
its n_r values per channel), then ONE all-gather of (n_r, mean_r, var_r) per layer, merged
exactly (Chan et al.) so that uneven per-rank batch sizes give the statistics of the
concatenated global batch:

    N = sum n_r,  mean = sum n_r mean_r / N,  var = sum n_r (var_r + (mean_r - mean)^2) / N.

Backward: the two per-channel sums of `norm_act_backward_reduce` (sum dL/dz and sum dL/dz * xhat)
and the element count are all-reduced in ONE collective; the input gradient then uses the
global means of those sums. Parameter gradients stay local sums: DDP averages them across ranks
like every other parameter gradient.

Both collectives travel in float64 (2C + 1 numbers): counts of whole CT volumes exceed float32's
exact integers. No host synchronization: the global count never leaves the device (the
kernels take the sums already divided by it, with count=1). Recomputation replays the global
statistics (`effseg.ops.replay`), so no collective runs in a recomputed forward.
"""
from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective with the other ranks failed: a rank exited, or did not reach the same
    collective within the process group's timeout."""


def guarded(what: str, fn):
    """Runs the collective `fn()`; a failure becomes a CollectiveError that says what failed
    and the likely reasons."""
    try:
        return fn()
    except (RuntimeError, ValueError) as exc:  # DistBackendError is a RuntimeError
        raise CollectiveError(
            f"effseg: the {what} failed: another rank of the process group exited or did not "
            f"reach it within the collective timeout (init_process_group(timeout=...), "
            f"`effseg train --dist-timeout`). All ranks must run the same layers and steps in "
            f"the same order. Cause: {exc}") from exc


@dataclass(frozen=True, eq=False)
class SyncGroup:
    """The process group a synchronized norm reduces over (None: the default group)."""

    group: object | None = None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


_warned = False


def resolve(process_group, training: bool) -> SyncGroup | None:
    """The group to synchronize over for one forward call of a synchronized norm, or None for
    the local op: in eval mode (no batch statistics), and, with one warning, when
    torch.distributed is not initialised (a single-process run of a synchronized model)."""
    global _warned
    if not training:
        return None
    if not distributed_ready():
        if not _warned:
            _warned = True
            warnings.warn(
                "effseg: InPlaceABNSync runs without torch.distributed initialised; it "
                "normalizes with this process's batch only (the local InPlaceABN). Start the "
                "run with torchrun, or call torch.distributed.init_process_group first.",
                RuntimeWarning, stacklevel=3)
        return None
    return SyncGroup(process_group)


def global_stats(mean: torch.Tensor, var: torch.Tensor, count: int, sync: SyncGroup
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, var, N) of the concatenated global batch from this rank's (mean, var) over
    `count` values per channel; N is a float64 0-d tensor on the statistics' device."""
    C = mean.numel()
    # new_full, not torch.tensor(..., device=cuda): no blocking host-to-device copy per layer
    local = torch.cat([mean.new_full((1,), float(count), dtype=torch.float64),
                       mean.to(torch.float64), var.to(torch.float64)])
    table = [torch.empty_like(local) for _ in range(sync.world_size)]
    guarded("statistics all-gather of a synchronized batch norm",
            lambda: dist.all_gather(table, local, group=sync.group))
    table = torch.stack(table)
    n, m, v = table[:, :1], table[:, 1:C + 1], table[:, C + 1:]
    total = n.sum()
    g_mean = (n * m).sum(0) / total
    g_var = (n * (v + (m - g_mean) ** 2)).sum(0) / total
    return g_mean.to(mean.dtype), g_var.to(var.dtype), total


def global_sum_means(sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor, count: int,
                     sync: SyncGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_r sum_dz_r / N and sum_r sum_dz_xhat_r / N over the group, N the global count."""
    packed = torch.cat([sum_dz.to(torch.float64), sum_dz_xhat.to(torch.float64),
                        sum_dz.new_full((1,), float(count), dtype=torch.float64)])
    guarded("backward all-reduce of a synchronized batch norm",
            lambda: dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=sync.group))
    C = sum_dz.numel()
    total = packed[-1]
    return (packed[:C] / total).to(sum_dz.dtype), (packed[C:2 * C] / total).to(
        sum_dz_xhat.dtype)


def input_grad_sums(sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor, x: torch.Tensor,
                    sync: SyncGroup | None):
    """(sum_dz, sum_dz_xhat, count) for `norm_act_backward_input`: the local sums and count
    (None: the kernel counts), or the global means with count 1 when synchronized."""
    if sync is None:
        return sum_dz, sum_dz_xhat, None
    return (*global_sum_means(sum_dz, sum_dz_xhat, local_count(x), sync), 1)


def timeout(seconds: float) -> datetime.timedelta:
    """A collective timeout for init_process_group, checked."""
    if not seconds > 0:
        raise ValueError(f"effseg: a collective timeout must be positive, got {seconds}")
    return datetime.timedelta(seconds=seconds)


def local_count(x: torch.Tensor) -> int:
    """Values per channel of a batch-norm input on this rank."""
    return x.numel() // x.shape[1]


__all__ = ["CollectiveError", "SyncGroup", "guarded", "distributed_ready", "global_stats", "global_sum_means",
           "input_grad_sums", "local_count", "resolve", "timeout"]
