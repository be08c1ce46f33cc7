"""Recording and replaying batch statistics across a recomputation.

A checkpointed region runs its forward twice: once for real, once during backward to rebuild
what it did not keep. Batch statistics must not be reduced again (wasted work) and running
statistics must not be updated again (pytorch/pytorch#96136). Inside `recording(tape)` every
effseg norm appends the statistics it computed to the tape; inside `replaying(tape)` it takes
them back in the same order instead of reducing, and leaves the running statistics alone.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

# A plain module-level stack rather than a thread-local one: torch.compile traces through it
# without a graph break. Recomputation runs in the thread that runs backward.
_STACK: list["StatsTape"] = []


class StatsTape:
    """The batch statistics of one forward pass of a recomputed region, in call order."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cursor: int | None = None  # None while recording

    @property
    def replaying(self) -> bool:
        return self.cursor is not None

    def record(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.entries.append((mean, var))

    def next(self, like: torch.Tensor, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor >= len(self.entries):
            raise RuntimeError(
                "effseg: the recomputation called more normalization layers than the forward "
                "pass did; a checkpointed function must run the same layers both times"
            )
        mean, var = self.entries[self.cursor]
        want = (like.shape[0], like.shape[1]) if per_sample else (like.shape[1],)
        if tuple(mean.shape) != want:
            raise RuntimeError(
                f"effseg: the recomputation differs from the forward pass: statistics of shape "
                f"{tuple(mean.shape)} recorded, {want} needed"
            )
        self.cursor += 1
        return mean, var


def _stack() -> list[StatsTape]:
    return _STACK


def current() -> StatsTape | None:
    """The innermost active tape, if any."""
    stack = _stack()
    return stack[-1] if stack else None


@contextmanager
def recording(tape: StatsTape) -> Iterator[StatsTape]:
    tape.entries.clear()
    tape.cursor = None
    _stack().append(tape)
    try:
        yield tape
    finally:
        _stack().pop()


@contextmanager
def replaying(tape: StatsTape) -> Iterator[StatsTape]:
    tape.cursor = 0
    _stack().append(tape)
    try:
        yield tape
    finally:
        _stack().pop()


def batch_stats(x: torch.Tensor, per_sample: bool, compute) -> tuple[tuple[torch.Tensor,
                                                                          torch.Tensor], bool]:
    """Statistics for a norm layer: replayed from the active tape, or computed by `compute()`
    (and recorded). Returns them and whether they are fresh (running statistics to update)."""
    tape = current()
    if tape is not None and tape.replaying:
        return tape.next(x, per_sample), False
    stats = compute()
    if tape is not None:
        tape.record(*stats)
    return stats, True
