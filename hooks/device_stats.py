"""A step's accelerator statistics, brought to the host in one transfer (UNVERIFIED on a GPU).

Data flow: snapshot.capture_on_device --tensor--> DeviceStatsBatch.add_tensor --> either the
Triton kernels (``hooks/triton_stats.py``: float16/bfloat16/float32/float64 CUDA tensors,
partial sums launched at capture, one reduction launch per step) or the torch-op reference
(``snapshot.stats_on_device``, ~15 ops per tensor; every other dtype, and every tensor when
triton is missing or failed its check) --flush at the step's end--> the Triton rows and the
stacked reference rows copied with non-blocking copies into one pinned host buffer reused
across steps, and one CUDA event --> the writer thread waits on the event and unpacks
(``snapshot.PendingEntry.resolve``). Every row is a float64
[norm, mean, min, max, nan, inf, fp_sum, fp_pos] vector.

Why the kernels start at capture and not at the step's end: a captured tensor is often changed
in place before the step ends (parameters by ``optimizer.step``, gradients by accumulation and
``zero_grad``, a BatchNorm output by ResNet's ``out += identity``), and the statistics must
describe it as captured. Work queued on the training stream at capture reads it in that state;
deferring would need a device copy of every tensor. So one partials launch per captured tensor,
except where graddiff captures many tensors in one loop with no user code in between (the
parameters at a step's start, the gradients at ``optimizer.step``, the buffers at the step's
end): ``group()`` defers those and launches one kernel per dtype.

No host sync on the training stream: kernels and copies are queued on the current stream; the
only wait is the writer thread's ``event.synchronize()``. The first use of a dtype on a device
compiles the kernels and checks them against the CPU definition on a side stream (waiting for
that stream only); a failure there, a missing triton, or a compile error gives one warning and
the reference path, never an error.

Reuse is safe because at most two older steps are alive when a step is filled (one queued,
one being written: ``BackgroundWriter`` holds one pending step); the ring keeps ``RING`` buffers
per device, and a buffer that must grow is replaced, never resized under a reader.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any, Optional

import torch

from .._warn import warn_user

#: Host buffers per device in the reuse ring (steps alive at once: filling, queued, writing).
RING = 4
#: Bytes of deferred (and watched) tensors held before they are settled early: the memory that
#: deferral may keep alive past a tensor's last use (activations are mostly alive until the
#: backward pass anyway; output gradients are not).
DEFER_BYTES = 256 * 2**20

_TRITON: dict[str, Any] = {"module": None, "failed": None}
_CHECKED: dict[tuple[torch.device, torch.dtype], bool] = {}


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels are not used for ``device`` (None when they may be)."""
    if os.environ.get("GRADDIFF_NO_TRITON", "") not in ("", "0"):
        return "disabled by GRADDIFF_NO_TRITON"
    if _TRITON["failed"] is not None:
        return _TRITON["failed"]
    if _TRITON["module"] is None:
        try:
            import triton  # noqa: F401

            from . import triton_stats
        except Exception as exc:  # ModuleNotFoundError on most machines: no warning
            _TRITON["failed"] = f"triton is not importable ({type(exc).__name__})"
            return _TRITON["failed"]
        _TRITON["module"] = triton_stats
    return None


def _disable_triton(exc: BaseException | str) -> None:
    if _TRITON["failed"] is None:
        why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        _TRITON["failed"] = " ".join(str(why).split())[:300]
        warn_user(
            f"graddiff: the Triton statistics kernels are unavailable ({_TRITON['failed']}); "
            f"accelerator tensors are summarised with torch ops, with the same results"
        )


class DeviceStatsBatch:
    """Collects one step's accelerator statistics and flushes them together.

    ``triton``: None uses the Triton kernels for CUDA tensors when they are available; True uses
    them for tensors on any device (the tests, on CPU tensors under ``TRITON_INTERPRET=1``);
    False never."""

    def __init__(self, triton: Optional[bool] = None) -> None:
        self._triton = triton
        self._pending: dict[Any, list[tuple[Any, torch.Tensor]]] = {}
        self._rows: dict[Any, list[tuple[Any, int]]] = {}
        self._steps: dict[Any, Any] = {}  # (device, stream) -> triton_stats.StepRows
        self._group: Optional[list[tuple[Any, torch.Tensor]]] = None
        self._group_thread = 0
        self._ring: dict[Any, list[Any]] = {}
        self._turn: dict[Any, int] = {}
        self.flushes = 0
        # deferral (see ``add_tensor``): (entry, tensor, version, record, stream key)
        self._deferred: list[tuple[Any, torch.Tensor, int, tuple, Any]] = []
        self._watched: list[tuple[torch.Tensor, int, tuple]] = []  # (tensor, version, record)
        self._held = 0
        self._safe: set[tuple] = set()  # records seen unchanged from capture to their settle
        self._unsafe: set[tuple] = set()  # records seen changed in place after capture
        self.dropped: list[Any] = []  # entries whose tensor changed before its deferred launch

    # -- adding ------------------------------------------------------------------------------
    def add(self, entry: Any, stats: torch.Tensor) -> None:
        """A row computed by the torch-op path (``snapshot.stats_on_device``)."""
        self._pending.setdefault(_key(stats.device), []).append((entry, stats))

    def add_tensor(self, entry: Any, x: torch.Tensor) -> bool:
        """Queue ``x``'s statistics on the Triton path; False when that path does not take it
        (the caller uses ``add``).

        Inside a ``group`` they start at its end. Outside (activations, output gradients,
        inputs, losses: one tensor per hook), a record (kind, name, call) whose tensor was
        seen unchanged from its capture to the next ``settle`` is *deferred*: its tensor is
        held, with its version counter, and launched at the next ``settle`` together with the
        others (one launch per device, stream and dtype), so a step's activations cost one
        launch at the forward's end and its output gradients one at the backward's end. A
        record seen for the first time is launched now and watched: held until the next
        ``settle``, which learns whether its tensor was changed in place meanwhile (ResNet's
        ``out += identity`` changes a BatchNorm output right after its hook); a record whose
        tensor was changed is launched at capture from then on. A deferred tensor found
        changed at its ``settle`` (the loop took another path) cannot be summarised as
        captured: its entry is dropped, with one warning, and the record launched at capture
        from then on. Tensors without a version counter (inference mode) launch now."""
        if not self._takes(x):
            return False
        if self._group is not None and self._group_thread == threading.get_ident():
            self._group.append((entry, x))
            return True
        try:
            version = x._version
        except RuntimeError:  # an inference tensor: no version counter, nothing to learn
            return self._launch([(entry, x)])
        record = (entry.kind, entry.name, entry.call)
        if record in self._safe:
            self._deferred.append((entry, x, version, record, _key(x.device)))
            self._hold(x)
            return True
        if not self._launch([(entry, x)]):
            return False
        if record not in self._unsafe:
            self._watched.append((x, version, record))
            self._hold(x)
        return True

    def _hold(self, x: torch.Tensor) -> None:
        self._held += x.numel() * x.element_size()
        if self._held > DEFER_BYTES:
            self.settle()

    def settle(self) -> None:
        """Launch the deferred statistics (one launch per device, stream and dtype) and learn
        from the watched tensors. The recorder calls it where a pass ends (the model's
        forward, a backward or ``autograd.grad``) and ``flush`` calls it first; the captured
        tensors are released here."""
        if not self._deferred and not self._watched:
            return
        deferred, self._deferred = self._deferred, []
        watched, self._watched = self._watched, []
        self._held = 0
        for x, version, record in watched:
            if x._version != version:
                self._unsafe.add(record)
            elif record not in self._unsafe:
                self._safe.add(record)
        by: dict[tuple[Any, torch.dtype], list[tuple[Any, torch.Tensor]]] = {}
        for entry, x, version, record, key in deferred:
            if x._version == version:
                by.setdefault((key, x.dtype), []).append((entry, x))
                continue
            self._safe.discard(record)
            self._unsafe.add(record)
            entry.dropped = True
            self.dropped.append(entry)
            warn_user(
                f"graddiff: {record[0]} {record[1]!r} (call {record[2]}) was changed in place "
                f"after its capture, before its deferred statistics were taken on the device; "
                f"it is not recorded at this step and is summarised at capture from now on"
            )
        for (key, _), items in by.items():
            with _on_stream(key):
                launched = self._launch(items, key)
            if not launched:
                from .snapshot import stats_on_device

                with _on_stream(key):
                    for entry, x in items:
                        self.add(entry, stats_on_device(x))

    def take_dropped(self) -> list[Any]:
        """The entries dropped since the last call (see ``add_tensor``)."""
        dropped, self.dropped = self.dropped, []
        return dropped

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Captures inside share one launch per (device, dtype) at exit. Only for loops that run
        no user code, so the tensors cannot change before the launch; captures from other
        threads (autograd's device threads) meanwhile launch at once."""
        if self._group is not None:  # nested: the outer group launches
            yield
            return
        self._group, self._group_thread = [], threading.get_ident()
        try:
            yield
        finally:
            items, self._group = self._group, None
            by: dict[tuple[torch.device, torch.dtype], list[tuple[Any, torch.Tensor]]] = {}
            for entry, x in items:
                by.setdefault((x.device, x.dtype), []).append((entry, x))
            for group in by.values():
                if not self._launch(group):
                    from .snapshot import stats_on_device

                    for entry, x in group:
                        self.add(entry, stats_on_device(x))

    def _takes(self, x: torch.Tensor) -> bool:
        if self._triton is False or (self._triton is None and x.device.type != "cuda"):
            return False
        if triton_unavailable_reason(x.device) is not None:
            return False
        mod = _TRITON["module"]
        if not mod.supported(x):
            return False
        key = (x.device, x.dtype)
        ok = _CHECKED.get(key)
        if ok is None:
            ok = _CHECKED[key] = self._check(x.device, x.dtype)
        return ok

    def _check(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Compile and check the kernels for (device, dtype) against the CPU definition, on a
        side stream (CUDA) so that the training stream is not waited for."""
        try:
            problem = _TRITON["module"].self_check(device, dtype)
        except Exception as exc:  # a compile error, a driver without support, ...
            _disable_triton(exc)
            return False
        if problem is not None:
            _disable_triton(f"self-check failed: {problem}")
            return False
        return True

    def _launch(self, items: list[tuple[Any, torch.Tensor]], key: Any = None) -> bool:
        """Partials of ``items`` (one device and dtype) in one launch, on the stream of
        ``key`` (default: the current one), recorded as rows of that stream's step."""
        if key is None:
            key = _key(items[0][1].device)
        rows = self._steps.get(key)
        if rows is None:
            rows = self._steps[key] = _TRITON["module"].StepRows(items[0][1].device)
        try:
            got = rows.launch([x for _, x in items])
        except Exception as exc:
            _disable_triton(exc)
            return False
        self._rows.setdefault(key, []).extend((e, r) for (e, _), r in zip(items, got))
        return True

    def __len__(self) -> int:
        return (
            sum(len(v) for v in self._pending.values())
            + sum(len(v) for v in self._rows.values())
            + len(self._deferred)
        )

    # -- the step's end --------------------------------------------------------------------------
    def flush(self) -> None:
        """Settle the deferred statistics; then per device: one reduction launch for the Triton
        rows, one stack of the reference rows, non-blocking copies into one pinned buffer, one
        event; no host sync for CUDA."""
        self.settle()
        pending, self._pending = self._pending, {}
        triton_rows, self._rows = self._rows, {}
        for key in list(dict.fromkeys([*triton_rows, *pending])):
            device = key[0]
            kernel_items = triton_rows.get(key, [])
            torch_items = pending.get(key, [])
            n_k, n = len(kernel_items), len(kernel_items) + len(torch_items)
            host = self._buffer(key, n)[:n]
            non_blocking = device.type == "cuda"
            with _on_stream(key):
                if kernel_items:  # rows 0..n_k-1 of the step, in capture order
                    host[:n_k].copy_(self._steps[key].finalize(), non_blocking=non_blocking)
                if torch_items:
                    stacked = torch.stack([v for _, v in torch_items])
                    host[n_k:].copy_(stacked, non_blocking=non_blocking)
                event = None
                if device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record()
            if device.type not in ("cpu", "cuda"):
                sync = getattr(getattr(torch, device.type, None), "synchronize", None)
                if sync is not None:
                    sync()
            items = [e for e, _ in kernel_items] + [e for e, _ in torch_items]
            for i, entry in enumerate(items):
                entry._stats_host = host[i]
                entry._event = event
            self.flushes += 1

    def _buffer(self, key: Any, rows: int) -> torch.Tensor:
        ring = self._ring.setdefault(key, [None] * RING)
        turn = self._turn.get(key, 0)
        self._turn[key] = (turn + 1) % RING
        buf = ring[turn]
        if buf is None or buf.shape[0] < rows:
            pin = key[0].type == "cuda"
            buf = ring[turn] = torch.empty((max(rows, 64), 8), dtype=torch.float64, pin_memory=pin)
        return buf


def _key(device: torch.device) -> tuple[torch.device, Any]:
    """(device, current stream): a step's rows are computed, reduced and copied in the order of
    the stream they were captured on, and the Triton arenas are reused in that order."""
    if device.type == "cuda":
        return device, torch.cuda.current_stream(device)
    return device, None


def _on_stream(key: tuple[torch.device, Any]) -> Any:
    return torch.cuda.stream(key[1]) if key[1] is not None else contextlib.nullcontext()
