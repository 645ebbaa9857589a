"""Per-step staging buffers for full values: one contiguous host buffer per step, reused.

Data flow: recorder --(a step's full-values tensors, copied straight into one arena)-->
BackgroundWriter --(the arena's used bytes, written in a few large pieces)--> HDF5.

A full-values step used to ``clone`` every tensor (a fresh allocation per tensor per step, its
pages faulted in again each time) and write each one on its own. With an arena the capture
copies each tensor once into a slot of a buffer whose pages were faulted in once, at the
arena's first use, and the writer writes the step's bytes from that same memory; no byte is copied
twice. A buffer goes back to its pool when the writer is done with it (or when the step is
dropped), so a trace holds at most the steps in flight (the one being captured, the one
queued and the one being written, ``BackgroundWriter``). This module knows only numpy; the
recorder allocates through ``alloc`` (pinned memory for accelerator models).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import numpy as np

#: Slot alignment in bytes: every tensor starts on a cache line (the fused kernel needs 8).
ALIGN = 64
#: At most this many idle arenas are kept for reuse.
MAX_IDLE = 3


def _alloc_numpy(nbytes: int) -> tuple[np.ndarray, Any]:
    # Not zeroed here: the pages are faulted in by the arena's first step of copies (as a
    # clone's would be), once; slot() zeroes the padding it leaves, and bytes no slot covers
    # are never written to the file.
    return np.empty(nbytes, dtype=np.uint8), None


class Arena:
    """One step's staging buffer: ``slot(n)`` hands out aligned, disjoint byte ranges."""

    def __init__(self, pool: Optional[ArenaPool], buf: np.ndarray, keepalive: Any = None) -> None:
        self.buf = buf
        self.keepalive = keepalive  # the allocation that owns ``buf`` (a pinned torch tensor)
        self.views: dict = {}  # the recorder's typed views of its slots, by (offset, dtype, shape)
        self.base = int(buf.__array_interface__["data"][0]) if buf.size else 0
        self.used = 0
        self.requested = 0  # bytes asked for this step, in slots (fitting or not)
        self._pool = pool
        self._released = False

    @property
    def capacity(self) -> int:
        return int(self.buf.size)

    def slot(self, nbytes: int) -> Optional[int]:
        """Offset of a fresh range of ``nbytes`` bytes, or None when it does not fit (the
        caller copies on its own; the pool grows the next arenas to the step's size)."""
        start = -(-self.used // ALIGN) * ALIGN
        self.requested += -(-max(nbytes, 1) // ALIGN) * ALIGN
        if start + nbytes > self.buf.size:
            return None
        if start > self.used:  # padding written as zeros: the file's bytes do not depend on
            self.buf[self.used : start] = 0  # what an earlier step left in the buffer
        self.used = start + nbytes
        return start

    def owns(self, addr: int, nbytes: int) -> Optional[int]:
        """The arena offset of ``nbytes`` bytes at address ``addr`` if they lie in the used
        part, else None."""
        off = addr - self.base
        if self.used and off >= 0 and off + nbytes <= self.used:
            return off
        return None

    def seal(self) -> None:
        """The step is complete: the pool sizes the next arenas to fit it (called on the
        training thread at the step's end, before the writer has released this one)."""
        if self._pool is not None:
            self._pool._fit(self.requested)

    def release(self) -> None:
        """Hand the buffer back to its pool (idempotent; the writer calls it when done)."""
        if self._released:
            return
        self._released = True
        if self._pool is not None:
            self._pool._give_back(self)


class ArenaPool:
    """Arenas sized to the largest step seen, reused across steps (thread-safe)."""

    def __init__(self, alloc: Callable[[int], tuple[np.ndarray, Any]] = _alloc_numpy) -> None:
        self._alloc = alloc
        self._idle: list[Arena] = []
        self._target = 0
        self._closed = False
        self._lock = threading.Lock()

    def acquire(self) -> Arena:
        """An empty arena of at least the largest step's size (0 before the first step is
        known: that step's tensors are copied one by one)."""
        with self._lock:
            target = self._target
            while self._idle:
                arena = self._idle.pop()
                if arena.capacity >= target:
                    arena.used = arena.requested = 0
                    arena._released = False
                    return arena
        if not target:
            return Arena(self, np.zeros(0, dtype=np.uint8))
        buf, keep = self._alloc(target)
        return Arena(self, buf, keep)

    def _fit(self, requested: int) -> None:
        with self._lock:
            # a step that did not fit sets the size of the next arenas (1/8 headroom for
            # shapes that vary a little from step to step, such as sequence lengths)
            if requested > self._target:
                self._target = requested + requested // 8

    def _give_back(self, arena: Arena) -> None:
        with self._lock:
            if (
                not self._closed
                and arena.capacity >= self._target
                and arena.capacity
                and len(self._idle) < MAX_IDLE
            ):
                self._idle.append(arena)

    def clear(self) -> None:
        """Drop the idle arenas and keep none handed back later (at the trace's end: the
        steps still being written free their arenas when the writer is done with them)."""
        with self._lock:
            self._closed = True
            self._idle.clear()
