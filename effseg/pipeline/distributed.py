"""Data-parallel training across processes on PyTorch's own engine: `torch.distributed`, DDP, and
`torchrun` as the launcher.

`torchrun --nproc_per_node=N -m effseg train ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `start()` reads them and opens the default process
group (NCCL when the run is on CUDA GPUs, gloo on CPUs) with a collective timeout, so that a rank
that dies or stalls makes the others fail with an error instead of hanging. Without those
variables (a plain `python -m effseg train`) everything here is the identity of a one-process
run.

Rank 0 alone writes: the plans and preprocessed cache, logs, metrics and checkpoints. The other
ranks receive what they need from it (`broadcast`). Each epoch's case order is the same on
every rank; `shard` hands each rank its own interleaved part of it, padded by wrapping around
so that every rank takes the same number of steps (as `DistributedSampler` does).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..ops.sync import guarded
from ..ops.sync import timeout as _timeout

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the group was opened here, and is closed by `finish`

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """Whether this process was started by torchrun (or with its environment)."""
    return all(k in os.environ for k in ENV) and int(os.environ["WORLD_SIZE"]) > 1


def start(device: str | None, timeout_s: float) -> tuple[Ranks, str | None]:
    """Opens the default process group when launched by torchrun (or uses one already open);
    returns the ranks and the device this rank trains on (None: the default device)."""
    if dist.is_available() and dist.is_initialized():
        owns = False
    elif launched():
        if not dist.is_available():
            raise RuntimeError("effseg: launched for distributed training, but this torch "
                               "build has no torch.distributed")
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_timeout(timeout_s))
        owns = True
    else:
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns)
    if dist.get_backend() == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"effseg: LOCAL_RANK {local_rank} but only "
                               f"{torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device is None:
        device = "cpu"
    return ranks, device


def finish(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        # A DDP wrapper caught in a reference cycle would otherwise be freed at interpreter
        # exit, after its process group: free it while the group still exists.
        gc.collect()
        dist.destroy_process_group()


def shard(items: Sequence, ranks: Ranks) -> list:
    """This rank's share of `items`: every world_size-th item from position `rank`, after
    padding the list by wrapping around to a multiple of world_size."""
    items = list(items)
    if not ranks.distributed or not items:
        return items
    total = -(-len(items) // ranks.world_size) * ranks.world_size
    padded = (items * (total // len(items) + 1))[:total]
    return padded[ranks.rank::ranks.world_size]


def _reduce(value: float, ranks: Ranks, op, device) -> float:
    if not ranks.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(device))
    guarded("all-reduce between training steps", lambda: dist.all_reduce(t, op=op))
    return float(t.item())


def _collective_device(device) -> torch.device:
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool, ranks: Ranks, device) -> bool:
    """Whether `flag` is set on any rank (a stop requested on one rank stops all at the same
    step)."""
    return _reduce(1.0 if flag else 0.0, ranks, dist.ReduceOp.MAX, device) > 0


def sum_over_ranks(value: float, ranks: Ranks, device) -> float:
    return _reduce(value, ranks, dist.ReduceOp.SUM, device)


def max_over_ranks(value: float, ranks: Ranks, device) -> float:
    return _reduce(value, ranks, dist.ReduceOp.MAX, device)


def gather(obj: Any, ranks: Ranks) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    out = [None] * ranks.world_size
    guarded("gathering of validation scores", lambda: dist.all_gather_object(out, obj))
    return out


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ranks.distributed:
        return obj
    box = [obj]
    guarded("broadcast of the run's settings from rank 0",
            lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        guarded("barrier", dist.barrier)
