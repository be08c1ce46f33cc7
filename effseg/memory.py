"""Measuring memory honestly.

- `saved_bytes(model, input)` (or `saved_bytes(fn)`): the bytes of the tensors autograd keeps for
  backward, each storage once: exact and device-independent, so it is tested like a result.
- `step_peak(model, input)`: the peak memory of one training step (forward, loss, backward,
  optimizer step) above what was allocated before it: CUDA's peak allocated bytes on a GPU, the
  peak resident set size on a CPU (Linux, with glibc told to return freed tensors' memory).
- `peak_allocated(fn)`: the peak of the bytes held by tensors that `fn()` creates, tracked op by
  op (a TorchDispatchMode): on any device, deterministic, what `torch.cuda.max_memory_allocated`
  reports for the same step without its caching and rounding. It does not see scratch memory
  that a kernel allocates and frees inside itself (cuDNN/oneDNN workspaces, effseg's O(C)
  partial sums), so on CPU it is the exact, reproducible figure to test against.
- `peak_rss_bytes`, `reset_peak_rss`, `rss_bytes`: the process's resident memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


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


def saved_bytes(model_or_fn: Callable, *inputs) -> int:
    """Bytes saved for backward by `model(*inputs)`, or by `fn()` when no inputs are given (a
    forward pass returning the output or the loss), each storage counted once. The graph is
    released afterwards."""
    with count_saved() as counter:
        out = model_or_fn(*inputs)
    del out
    return counter.bytes


def _storage_key(t: torch.Tensor) -> int:
    # The storage object itself, not its data pointer: resize_ moves the data of a storage.
    return t.untyped_storage()._cdata


class _LiveBytes(TorchDispatchMode):
    """Follows every storage allocated by an op while active, and the peak of their total.

    A storage is counted once, when an op first returns it, unless it existed before: every
    storage an op receives that the tracker has not seen allocated is taken as pre-existing, so
    views of it, in-place updates of it and outputs aliasing it add nothing. (A storage freed
    inside the call lets its address be reused; the expired reference tells them apart.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.before: dict[int, StorageWeakRef] = {}
        self.current = 0
        self.peak = 0

    def _note_existing(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key in self.live and not self.live[key][0].expired():
            return
        ref = self.before.get(key)
        if ref is None or ref.expired():
            self.before[key] = StorageWeakRef(t.untyped_storage())

    def _existed_before(self, key: int) -> bool:
        ref = self.before.get(key)
        if ref is None:
            return False
        if ref.expired():
            del self.before[key]
            return False
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._note_existing(t)
        out = func(*args, **(kwargs or {}))
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            key = _storage_key(t)
            nbytes = storage.nbytes()
            if key in self.live:
                # An out= or resize_ op may grow a storage allocated here.
                grown = nbytes - self.live[key][1]
                if grown > 0:
                    self.live[key] = (self.live[key][0], nbytes)
                    self.current += grown
            elif nbytes and not self._existed_before(key):
                self.live[key] = (StorageWeakRef(storage), nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes held at any moment by the storages allocated while `fn()` runs (its forward,
    backward and optimizer step alike). Tensors that existed before are not counted, nor are
    views of them, in-place updates of them or outputs that alias them: an optimizer step counts
    its new state and temporaries, not the parameters it updates. See the module docstring for
    what it does not see."""
    with _LiveBytes() as tracker:
        result = fn()
    del result
    return tracker.peak


def _default_loss(out) -> torch.Tensor:
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum(o.float().square().mean() for o in outs)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None and sys.platform.startswith("linux"):
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    return _LIBC or None


_MALLOC_SET = False


def _return_freed_memory() -> bool:
    """Makes the RSS follow what is alive (Linux, glibc): allocations above 64 KiB are served
    with mmap from now on, so that freeing a tensor gives its memory back, and memory that was
    freed earlier but kept by the allocator (glibc keeps freed chunks of up to 32 MiB in its
    arenas and hands them out again without a page fault, so a step that reuses them does not
    raise the RSS) is returned now with malloc_trim. False where this is not possible."""
    global _MALLOC_SET
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    if not _MALLOC_SET:
        m_mmap_threshold = -3
        if not hasattr(libc, "mallopt") or libc.mallopt(m_mmap_threshold, 65536) != 1:
            return False
        _MALLOC_SET = True
    libc.malloc_trim(0)
    return True


def step_peak(model: torch.nn.Module, input: torch.Tensor, target=None,
              loss_fn: Callable | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> int:
    """Peak bytes of one training step above the memory held before it.

    The step is forward, `loss_fn(output, target)` (default: mean of squared outputs),
    backward and `optimizer.step()` (default: SGD, which keeps no state). On CUDA the peak is
    `torch.cuda.max_memory_allocated`; on CPU the peak RSS (Linux with glibc), which also
    counts allocations outside torch (oneDNN scratch space): memory the allocator kept from
    earlier frees is returned first, and a figure below the tensors the step held at once
    (`peak_allocated`, tracked in the same run) raises an error instead of being returned.
    """
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=1e-3)
    cuda = input.device.type == "cuda"

    def step():
        out = model(input)
        loss = loss_fn(out, target) if loss_fn is not None else _default_loss(out)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Gradients left from before are freed before the base is read, not inside the step: a
    # step that frees them and allocates new ones would otherwise be credited with their size.
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(input.device)
        torch.cuda.reset_peak_memory_stats(input.device)
        base = torch.cuda.memory_allocated(input.device)
        step()
        torch.cuda.synchronize(input.device)
        return torch.cuda.max_memory_allocated(input.device) - base
    if not _return_freed_memory() or not reset_peak_rss():
        raise RuntimeError("effseg: step_peak on CPU needs Linux with glibc (mallopt, "
                           "malloc_trim and /proc/self/clear_refs) to see a step's peak in the "
                           "RSS; use effseg.memory.peak_allocated (tensors) or measure on CUDA")
    base = rss_bytes()
    with _LiveBytes() as tensors:
        step()
    peak = peak_rss_bytes() - base
    if peak < tensors.peak:
        # Tensors alive at once were resident at once: an RSS below them means the step ran in
        # memory that was resident before it (another allocator's cache), which the RSS cannot
        # attribute to it.
        raise RuntimeError(
            f"effseg: step_peak: the RSS grew by {peak} bytes while the step's tensors held "
            f"{tensors.peak} bytes at once, so the step reused memory that was resident before "
            "it and the RSS cannot measure it; use effseg.memory.peak_allocated")
    return peak


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
