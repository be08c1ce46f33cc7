"""Measuring memory honestly.

`saved_bytes` counts the bytes of the tensors autograd keeps for backward, each storage once:
exact and device-independent, so it can be tested like a result. `peak_rss_bytes` is the
process's peak resident memory, and `cuda_peak_bytes` the CUDA caching allocator's peak.
"""
from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


class SavedTensorCounter:
    """Bytes of distinct storages saved for backward while active (see `count_saved`)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        self._seen[key] = max(self._seen.get(key, 0), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def storages(self) -> int:
        return len(self._seen)


@contextmanager
def count_saved() -> Iterator[SavedTensorCounter]:
    """Counts what autograd saves for backward inside the block (parameters included)."""
    counter = SavedTensorCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter._pack, lambda t: t):
        yield counter


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes saved for backward by `fn()` (a forward pass returning the loss or output), each
    storage counted once. The graph is released afterwards."""
    with count_saved() as counter:
        out = fn()
    del out
    return counter.bytes


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), else its peak so far."""
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Resets the process's peak RSS to its current RSS (Linux: /proc/self/clear_refs), so that
    `peak_rss_bytes` measures what follows. Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since the last `reset_peak_rss`, on Linux)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cuda_peak_bytes(device: torch.device | None = None) -> int:
    return torch.cuda.max_memory_allocated(device)
