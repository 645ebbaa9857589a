"""Write finished steps into a trace file, on a background thread, never stalling training.

Data flow: recorder --(one finished step: list of entries)--> BackgroundWriter --> TraceWriter
--> HDF5 (layout in ``graddiff.format``). The queue holds at most one step besides the one
being written, so memory stays bounded and a kill -9 loses at most the last two steps.

Failure policy: a write error (disk full, file too large, I/O error) stops recording with one
warning; training goes on; the file stays readable up to the last complete step. Free space
and the process file-size limit are checked before each step so that the disk-full path, which
can crash h5py at interpreter exit (FIELD-NOTES 10), is normally never reached; a small
ballast file is released before closing if it is.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import h5py
import numpy as np
from h5py import h5s, h5t

from ._version import __version__
from ._warn import warn_user
from .entries import EntryData
from .filelock import WriterLock
from .format import (
    ENTRY_DTYPE,
    FLAG_NDIM_CLIPPED,
    FLAG_VALUES,
    FORMAT_MARKER,
    FORMAT_VERSION,
    MAX_NDIM,
    OPTIMIZER_DTYPE,
    RECORD_DTYPE,
    STEP_DTYPE,
    TABLE_CHUNK_ROWS,
)
from .kinds import CAUSAL_RANK

#: Stop recording when fewer bytes than this (plus twice the last step's size) remain free.
MIN_FREE_BYTES = 64 * 2**20
BALLAST_BYTES = 4 * 2**20
#: Tensors at least this large are written from their own memory, without concatenation.
DIRECT_WRITE_BYTES = 1 * 2**20


#: Cached row layouts per (record, shape) at most (see ``TraceWriter._layout``).
_MAX_LAYOUTS = 65536
_SHAPE_PAD = [(0,) * (MAX_NDIM - k) for k in range(MAX_NDIM + 1)]


# HDF5 memory types of the two per-step tables, built once (h5py's ``ds[a:b] = rows`` builds
# them, and a selection, on every call: about 150 us per call on a 27-row step).
_ENTRY_MTYPE = h5t.py_create(ENTRY_DTYPE)
_STEP_MTYPE = h5t.py_create(STEP_DTYPE)


def _append(ds: h5py.Dataset, mtype: h5t.TypeID, rows: np.ndarray, n: int) -> None:
    """Append ``rows`` to the 1-D resizable table ``ds`` of length ``n`` (h5py's low-level API:
    the same HDF5 calls as ``ds.resize`` + ``ds[n:] = rows``, without their Python layers)."""
    k = rows.shape[0]
    dsid = ds.id
    dsid.set_extent((n + k,))
    space = dsid.get_space()
    space.select_hyperslab((n,), (k,))
    dsid.write(h5s.create_simple((k,)), space, rows, mtype)


class WriteFailed(Exception):
    """Internal: the trace file cannot take more steps. Carries the one-line reason."""


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class TraceWriter:
    """Synchronous writer of one trace file. Not thread-safe; one thread owns it."""

    def __init__(
        self,
        path: str,
        environment: Optional[dict] = None,
        options: Optional[dict] = None,
        *,
        ballast: bool = True,
        module_classes: Optional[dict] = None,
    ) -> None:
        self.path = str(path)
        self._record_ids: dict[tuple[str, str, int, str], int] = {}
        self._layouts: dict[tuple, tuple[int, int, tuple, int, int]] = {}
        self._n_entries = 0
        self._n_steps = 0
        self._optimizer: Optional[h5py.Dataset] = None  # /optimizer, made at its first row
        self._step_row = np.zeros(1, dtype=STEP_DTYPE)
        self._last_step_bytes = 0
        self._ballast_path: Optional[str] = None
        # The lock comes first: HDF5 truncates before it locks (graddiff/filelock.py).
        self._lock: Optional[WriterLock] = WriterLock(self.path)
        try:
            self._create(environment, options, ballast)
        except BaseException:
            self._release_ballast()
            self._lock.release()
            raise
        if module_classes:  # the tracer sets it later (set_attr); synthetic traces pass it here
            self.set_attr("module_classes", _json(module_classes))

    def _create(self, environment: Optional[dict], options: Optional[dict], ballast: bool) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if ballast:
            self._ballast_path = os.path.join(
                directory, "." + os.path.basename(self.path) + ".graddiff-ballast"
            )
            try:
                with open(self._ballast_path, "wb") as fh:
                    fh.write(b"\0" * BALLAST_BYTES)
            except OSError:
                self._release_ballast()
        # default libver: survives kill -9 (FIELD-NOTES 9); HDF5's own locking off, the
        # WriterLock held until close() excludes other writers and readers instead.
        self._file = h5py.File(self.path, "w", locking=False)
        f = self._file
        f.attrs["graddiff_format"] = FORMAT_MARKER
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["graddiff_version"] = __version__
        f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        f.attrs["environment"] = _json(environment or {})
        f.attrs["options"] = _json(options or {})
        f.attrs["status"] = "recording"
        f.attrs["values_note"] = ""
        self._records = f.create_dataset(
            "records", (0,), dtype=RECORD_DTYPE, maxshape=(None,), chunks=(256,)
        )
        self._entries = f.create_dataset(
            "entries", (0,), dtype=ENTRY_DTYPE, maxshape=(None,), chunks=(TABLE_CHUNK_ROWS,)
        )
        self._steps = f.create_dataset(
            "steps", (0,), dtype=STEP_DTYPE, maxshape=(None,), chunks=(TABLE_CHUNK_ROWS,)
        )
        self._values = f.create_group("values")
        f.flush()

    # -- one step -----------------------------------------------------------------------
    def write_step(
        self, step: int, entries: Sequence[EntryData], optimizer: Optional[list] = None
    ) -> int:
        """Append one complete step, flush, and mark it complete. Returns bytes of values.
        ``optimizer``: the changes of the optimizer settings at this step (``/optimizer``)."""
        entries = sorted(entries, key=lambda e: (CAUSAL_RANK.get(e.kind, 99), e.seq))
        rows, new_records, blobs, offset = self._rows(step, entries)
        self._check_space(offset)
        if new_records:
            recs = np.zeros(len(new_records), dtype=RECORD_DTYPE)
            for i, (kind, name, call, dtype) in enumerate(new_records):
                recs[i] = (kind.encode(), name, call, dtype.encode())
            n = self._records.shape[0]
            self._records.resize((n + len(recs),))
            self._records[n:] = recs
        start = self._n_entries
        if len(rows):
            _append(self._entries, _ENTRY_MTYPE, rows, start)
        if blobs:
            self._write_values(f"{step:08d}", blobs, offset)
        if optimizer:
            self._write_optimizer(step, optimizer)
        self._n_entries = start + len(rows)
        row = self._step_row
        row[0] = (step, start, self._n_entries, 1 if blobs else 0, time.time())
        _append(self._steps, _STEP_MTYPE, row, self._n_steps)
        self._n_steps += 1
        self._file.flush()  # the commit: after this, the step survives kill -9
        self._last_step_bytes = offset + rows.nbytes
        return offset

    def _write_optimizer(self, step: int, changes: list) -> None:
        """One ``/optimizer`` row: the step and its settings changes as JSON (before the
        commit marker, so a row whose step is not committed is ignored by readers)."""
        if self._optimizer is None:
            self._optimizer = self._file.create_dataset(
                "optimizer", (0,), dtype=OPTIMIZER_DTYPE, maxshape=(None,), chunks=(64,)
            )
        ds = self._optimizer
        n = ds.shape[0]
        ds.resize((n + 1,))
        row = np.zeros(1, dtype=OPTIMIZER_DTYPE)
        row[0] = (step, json.dumps(changes, sort_keys=True, default=str))
        ds[n:] = row

    def _rows(self, step: int, entries: Sequence[EntryData]) -> tuple[np.ndarray, list, list, int]:
        """The step's entry rows, built column-wise (one numpy assignment per column).

        What a row takes from its record and shape (record id, ndim, padded shape, numel, the
        clipped flag) is looked up once per distinct (record, shape) and cached: a training
        loop repeats the same records step after step, so a step costs one dict lookup per
        entry plus the column assignments.
        """
        n = len(entries)
        rows = np.zeros(n, dtype=ENTRY_DTYPE)
        new_records: list[tuple[str, str, int, str]] = []
        blobs: list[np.ndarray] = []
        if not n:
            return rows, new_records, blobs, 0
        layouts = self._layouts
        lays = []
        for e in entries:
            lay = layouts.get((e.kind, e.name, e.call, e.dtype, e.shape))
            if lay is None:
                lay = self._layout(e, new_records)
            lays.append(lay)
        flags_col = [e.flags | lay[4] for e, lay in zip(entries, lays)]
        offset = 0
        off_col: Optional[list[int]] = None
        stored: dict[int, tuple[int, int]] = {}
        for i, e in enumerate(entries):
            if e.values is None:
                continue
            if off_col is None:
                off_col, nbytes_col = [-1] * n, [0] * n
            placed = stored.get(id(e.values))
            if placed is None:  # the same array twice in a step is stored once
                raw = np.ascontiguousarray(e.values).reshape(-1).view(np.uint8)
                placed = stored[id(e.values)] = (offset, raw.size)
                blobs.append(raw)
                offset += raw.size
            off_col[i], nbytes_col[i] = placed
            flags_col[i] |= FLAG_VALUES
        rows["step"] = step
        rows["record"] = [lay[0] for lay in lays]
        rows["seq"] = [e.seq for e in entries]
        rows["ndim"] = [lay[1] for lay in lays]
        rows["shape"] = [lay[2] for lay in lays]
        rows["flags"] = flags_col
        rows["numel"] = [lay[3] for lay in lays]
        fps = np.array([e.fingerprint for e in entries], dtype=np.uint64)
        rows["fp_sum"], rows["fp_pos"] = fps[:, 0], fps[:, 1]
        stats = np.array([e.stats for e in entries], dtype=np.float64)
        rows["norm"], rows["mean"], rows["min"], rows["max"] = stats[:, :4].T
        rows["nan"], rows["inf"] = stats[:, 4], stats[:, 5]  # counts: exact in float64
        if off_col is None:
            rows["offset"] = -1
        else:
            rows["offset"] = off_col
            rows["nbytes"] = nbytes_col
        return rows, new_records, blobs, offset

    def _layout(self, e: EntryData, new_records: list) -> tuple[int, int, tuple, int, int]:
        """(record id, ndim, shape padded to MAX_NDIM, numel, extra flags) of an entry; a new
        record is appended to ``new_records``. Cached per (record, shape), bounded."""
        key = (e.kind, e.name, int(e.call), e.dtype)
        rid = self._record_ids.get(key)
        if rid is None:
            rid = self._record_ids[key] = len(self._record_ids)
            new_records.append(key)
        shape = tuple(int(d) for d in e.shape)
        numel = 1
        for d in shape:
            numel *= d
        clipped = 0
        if len(shape) > MAX_NDIM:
            shape, clipped = (numel,), FLAG_NDIM_CLIPPED
        lay = (rid, len(shape), shape + _SHAPE_PAD[len(shape)], numel, clipped)
        if len(self._layouts) >= _MAX_LAYOUTS:  # shapes that change every step: stay bounded
            self._layouts.clear()
        self._layouts[(e.kind, e.name, e.call, e.dtype, e.shape)] = lay
        return lay

    def _write_values(self, name: str, blobs: list[np.ndarray], total: int) -> None:
        """One contiguous dataset per step (the cheapest HDF5 layout, FIELD-NOTES 8).

        Large tensors are written straight from their own memory into their slice; only runs of
        small ones are concatenated first, so the step's bytes are not copied once more.
        """
        ds = self._values.create_dataset(name, (total,), dtype=np.uint8)
        pending: list[np.ndarray] = []
        start = offset = 0

        def flush_pending() -> None:
            if pending:
                chunk = pending[0] if len(pending) == 1 else np.concatenate(pending)
                ds.write_direct(chunk, dest_sel=np.s_[start : start + chunk.size])
                pending.clear()

        for raw in blobs:
            if raw.size >= DIRECT_WRITE_BYTES:
                flush_pending()
                ds.write_direct(raw, dest_sel=np.s_[offset : offset + raw.size])
                start = offset + raw.size
            else:
                if not pending:
                    start = offset
                pending.append(raw)
            offset += raw.size
        flush_pending()

    def _check_space(self, value_bytes: int) -> None:
        need = value_bytes + 2 * self._last_step_bytes + MIN_FREE_BYTES
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        except OSError:
            return
        if free < need:
            raise WriteFailed(
                f"only {free / 2**20:.0f} MiB free on the disk of {self.path}; "
                f"recording stopped to keep the file readable"
            )
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        except (ImportError, ValueError, OSError):
            return
        if soft != resource.RLIM_INFINITY:
            size = os.path.getsize(self.path)
            if size + value_bytes + 2 * self._last_step_bytes + 2**20 > soft:
                raise WriteFailed(
                    f"{self.path} would exceed the process file-size limit "
                    f"(ulimit -f, {soft} bytes); recording stopped"
                )

    # -- metadata and closing -------------------------------------------------------------
    def set_attr(self, key: str, value: str) -> None:
        self._file.attrs[key] = value

    def close(self, status: str = "complete") -> None:
        """Mark the final status and close. Safe to call twice; never raises."""
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.attrs["status"] = status
            f.flush()
        except Exception:  # disk full: free the ballast so HDF5 can write its metadata
            self._release_ballast()
        try:
            f.close()
        except Exception:
            self._release_ballast()
            try:
                f.close()
            except Exception:
                pass
        self._release_ballast()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _release_ballast(self) -> None:
        if self._ballast_path:
            try:
                os.unlink(self._ballast_path)
            except OSError:
                pass
            self._ballast_path = None


def _one_line(exc: BaseException) -> str:
    """A write error as one short line. HDF5's messages span lines (a timestamp with a newline,
    buffer addresses), and they end up in the warning and in the file's ``status``."""
    code = getattr(exc, "errno", None)
    if not code:  # RuntimeError from flush/close: the errno is only inside the text
        m = re.search(r"errno = (\d+), error message = '([^']*)'", str(exc))
        if m:
            return f"{m.group(2)} (errno {m.group(1)})"
    elif code > 0:
        return f"{os.strerror(code)} (errno {code})"
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


_STOP = object()


class BackgroundWriter:
    """Runs a TraceWriter on its own thread; ``submit`` blocks only when two steps are pending."""

    def __init__(self, writer_factory, *, max_pending: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._failure: Optional[str] = None
        self._warned = False
        self._writer: Optional[TraceWriter] = None
        self._factory = writer_factory
        self.bytes_written = 0
        self.steps_written = 0
        self.write_seconds = 0.0
        self._ready = threading.Event()
        self._init_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="graddiff-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            raise self._init_error

    @property
    def failed(self) -> Optional[str]:
        return self._failure

    def _run(self) -> None:
        try:
            self._writer = self._factory()
        except BaseException as exc:  # surfaced to the caller of __init__
            self._init_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            what, step, payload, optimizer = item
            if self._failure is not None:
                continue
            t0 = time.perf_counter()
            try:
                if what == "attr":
                    self._writer.set_attr(*payload)
                    continue
                resolved = [e.resolve() for e in payload]
                if optimizer:
                    written = self._writer.write_step(step, resolved, optimizer=optimizer)
                else:
                    written = self._writer.write_step(step, resolved)
                self.bytes_written += written
                self.steps_written += 1
            except WriteFailed as exc:
                self._failure = str(exc)
            except Exception as exc:  # any I/O error: stop recording, keep training
                self._failure = (
                    f"writing step {step} to {self._writer.path} failed: {_one_line(exc)}"
                )
            finally:
                self.write_seconds += time.perf_counter() - t0

    def submit(self, step: int, entries: list, optimizer: Optional[list] = None) -> None:
        """Queue a finished step (with its optimizer settings changes, if any). After a
        failure, steps are dropped and one warning is given."""
        self.warn_if_failed()
        if self._failure is None:
            self._queue.put(("step", step, entries, optimizer))

    def warn_if_failed(self) -> None:
        if self._failure is not None and not self._warned:
            self._warned = True
            warn_user(
                f"graddiff: {self._failure}; training continues, the trace keeps the steps "
                f"completed before this"
            )

    def set_attr(self, key: str, value: str) -> None:
        """Queue an attribute update (runs on the writer thread, in order with steps)."""
        if self._failure is None:
            self._queue.put(("attr", None, (key, value), None))

    def close(self, status: str = "complete") -> None:
        """Drain the queue, write the final status, close the file. Never raises."""
        self._queue.put(_STOP)
        self._thread.join()
        if self._writer is not None:
            final = status if self._failure is None else f"stopped: {self._failure}"
            self._writer.close(final)
        self.warn_if_failed()
