"""A step's accelerator statistics, brought to the host in one transfer (UNVERIFIED on a GPU).

Data flow: snapshot (one float64 [norm, mean, min, max, nan, inf, fp_sum, fp_pos] vector per
tensor, computed on the device with no host sync) --add--> DeviceStatsBatch --flush at the
step's end--> one ``torch.stack`` and one non-blocking copy per device into a pinned host buffer
reused across steps, and one CUDA event --> the writer thread waits on the event and unpacks.

Reuse is safe because at most two older steps are alive when a step is filled (one queued,
one being written: ``BackgroundWriter`` holds one pending step); the ring keeps ``RING`` buffers
per device, and a buffer that must grow is replaced, never resized under a reader.

This path has not run on a GPU: the development and CI machines have none. Its logic is tested
on CPU tensors (no pinning, no event), where it must give the same results as the CPU path.
"""

from __future__ import annotations

from typing import Any

import torch

#: Host buffers per device in the reuse ring (steps alive at once: filling, queued, writing).
RING = 4


class DeviceStatsBatch:
    """Collects (entry, device stats vector) pairs for one step and flushes them together."""

    def __init__(self) -> None:
        self._pending: dict[torch.device, list[tuple[Any, torch.Tensor]]] = {}
        self._ring: dict[torch.device, list[Any]] = {}
        self._turn: dict[torch.device, int] = {}
        self.flushes = 0

    def add(self, entry: Any, stats: torch.Tensor) -> None:
        self._pending.setdefault(stats.device, []).append((entry, stats))

    def __len__(self) -> int:
        return sum(len(v) for v in self._pending.values())

    def flush(self) -> None:
        """One stack + one async copy + one event per device; no host sync for CUDA."""
        pending, self._pending = self._pending, {}
        for device, items in pending.items():
            stacked = torch.stack([v for _, v in items])
            host = self._buffer(device, len(items))[: len(items)]
            host.copy_(stacked, non_blocking=device.type == "cuda")
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            elif device.type != "cpu":
                sync = getattr(getattr(torch, device.type, None), "synchronize", None)
                if sync is not None:
                    sync()
            for i, (entry, _) in enumerate(items):
                entry._stats_host = host[i]
                entry._event = event
            self.flushes += 1

    def _buffer(self, device: torch.device, rows: int) -> torch.Tensor:
        ring = self._ring.setdefault(device, [None] * RING)
        turn = self._turn.get(device, 0)
        self._turn[device] = (turn + 1) % RING
        buf = ring[turn]
        if buf is None or buf.shape[0] < rows:
            pin = device.type == "cuda"
            buf = ring[turn] = torch.empty((max(rows, 64), 8), dtype=torch.float64, pin_memory=pin)
        return buf
