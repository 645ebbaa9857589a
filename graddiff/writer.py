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
from h5py import h5d, h5p, h5s, h5t

from ._version import __version__
from ._warn import warn_user
from .arena import ALIGN, Arena
from .entries import EntryData
from .falloc import Reserver
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
#: Values are written in pieces of at most this many bytes (one HDF5 write call each).
#: Measured (docs/performance.md, "Full mode"): writing 72.8 MB per step into a growing file
#: cost 16.8 ms of CPU in 2 MiB pieces and 15.9 in 4 MiB (stable over rounds), 19.3 in 1 MiB,
#: 29 in 256 KiB (per-call overhead), and 46 ms (18-54 over rounds) as one write per step.
#: With the range reserved first (2026-12-01): 10.8 ms in 2 MiB pieces, 10.9 in 4 or 8 MiB
#: (with rounds 4-7x slower), 11.6 in 1 MiB.
WRITE_BYTES = 2 * 2**20
#: Free space and the file-size limit are checked again before a step once the bytes written
#: since the last check could exceed what that check left spare, and at least every this
#: many bytes (others may fill the disk too). A check costs two system calls that each release
#: and retake the GIL, which the training thread pays for; a statistics-only step adds a few
#: KB, so checking before every step was nearly all waste.
RECHECK_BYTES = 8 * 2**20
#: What a step may add to the file besides its values and rows, counted against the spare
#: bytes: a new chunk of the entries and steps tables, and object headers and links.
_STEP_SLACK = TABLE_CHUNK_ROWS * (ENTRY_DTYPE.itemsize + STEP_DTYPE.itemsize) + 64 * 2**10
#: Segments smaller than this are gathered into the staging buffer and written together.
STAGE_BYTES = 256 * 2**10
#: A step's values of at least this many bytes get their file range reserved before they are
#: written (``graddiff.falloc``: about a third less CPU for the write, measured from 3.8 MB).
RESERVE_BYTES = 64 * 2**10
_U8 = h5t.NATIVE_UINT8


def _values_dcpl() -> h5p.PropDCID:
    """Creation properties of a step's values dataset: contiguous (HDF5's default), its space
    allocated when it is created (so its file range is known before the write, to reserve it)
    and never filled (every byte is written right after); no timestamps, as h5py's default."""
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    return dcpl


_VALUES_DCPL = _values_dcpl()


#: Cached row layouts per (record, shape) at most (see ``TraceWriter._layout``).
_MAX_LAYOUTS = 65536
_SHAPE_PAD = [(0,) * (MAX_NDIM - k) for k in range(MAX_NDIM + 1)]
#: What a row takes from its record and shape alone, one row per cached layout.
_LAYOUT_DTYPE = np.dtype(
    [
        ("record", ENTRY_DTYPE["record"]),
        ("ndim", ENTRY_DTYPE["ndim"]),
        ("flags", ENTRY_DTYPE["flags"]),
        ("shape", ENTRY_DTYPE["shape"]),
        ("numel", ENTRY_DTYPE["numel"]),
    ]
)


# HDF5 memory types of the two per-step tables, built once (h5py's ``ds[a:b] = rows`` builds
# them, and a selection, on every call: about 150 us per call on a 27-row step).
_ENTRY_MTYPE = h5t.py_create(ENTRY_DTYPE)
_STEP_MTYPE = h5t.py_create(STEP_DTYPE)


class _Appender:
    """Appends rows to a 1-D resizable table (h5py's low-level API: the same HDF5 calls as
    ``ds.resize`` + ``ds[n:] = rows``, without their Python layers). It keeps its own file
    dataspace, resized with the table, and a memory dataspace per row count: no
    ``H5Dget_space`` per append, which releases and retakes the GIL (a hand-off the training
    thread pays for) and cost about 5 us."""

    def __init__(self, ds: h5py.Dataset, mtype: h5t.TypeID) -> None:
        self._dsid = ds.id
        self._mtype = mtype
        self._space = ds.id.get_space()
        self._mem: dict[int, h5s.SpaceID] = {}

    def __call__(self, rows: np.ndarray, n: int) -> None:
        """Append ``rows`` to the table, which holds ``n`` rows."""
        k = rows.shape[0]
        self._dsid.set_extent((n + k,))
        space = self._space
        space.set_extent_simple((n + k,), (h5s.UNLIMITED,))
        space.select_hyperslab((n,), (k,))
        mem = self._mem.get(k)
        if mem is None:
            if len(self._mem) >= 64:  # row counts that change every step: stay bounded
                self._mem.clear()
            mem = self._mem[k] = h5s.create_simple((k,))
        self._dsid.write(mem, space, rows, self._mtype)


def _place_values(
    entries: Sequence[EntryData], arena: Optional[Arena]
) -> Optional[tuple[list[int], list[int], list[tuple[int, np.ndarray]], int]]:
    """Where each entry's values go in the step's values dataset: (offset column, nbytes
    column, segments in file order, total bytes); None when no entry keeps values.

    Values that lie in the step's arena keep their arena order: the arena's referenced slots
    become runs (slots separated only by alignment padding are one run) written from the
    arena itself. Other values (device copies, entries built from numpy, tensors that did not
    fit) follow, each once: the same array twice in a step is stored once.
    """
    n = len(entries)
    off_col: Optional[list[int]] = None
    in_arena: list[tuple[int, int]] = []  # (entry index, arena offset)
    slots: dict[int, int] = {}  # arena offset -> bytes
    others: list[tuple[int, int]] = []  # (entry index, index into extra)
    extra: list[np.ndarray] = []
    seen: dict[int, int] = {}
    for i, e in enumerate(entries):
        v = e.values
        if v is None:
            continue
        if off_col is None:
            off_col, nbytes_col = [-1] * n, [0] * n
        if arena is not None and v.flags.c_contiguous:
            a = arena.owns(v.__array_interface__["data"][0], v.nbytes)
            if a is not None:
                in_arena.append((i, a))
                nbytes_col[i] = v.nbytes
                if v.nbytes >= slots.get(a, 0):
                    slots[a] = v.nbytes
                continue
        k = seen.get(id(v))
        if k is None:  # the same array twice in a step is stored once
            k = seen[id(v)] = len(extra)
            extra.append(np.ascontiguousarray(v).reshape(-1).view(np.uint8))
        others.append((i, k))
    if off_col is None:
        return None
    segments: list[tuple[int, np.ndarray]] = []
    shift: dict[int, int] = {}  # arena offset -> file offset - arena offset
    total = 0
    if slots:
        starts = sorted(slots)
        run_start = run_end = starts[0]
        for a in starts:
            if a - run_end >= ALIGN:  # an unreferenced slot lies between: a new run
                segments.append((total, arena.buf[run_start:run_end]))  # type: ignore[union-attr]
                total += run_end - run_start
                run_start = a
            shift[a] = total - run_start
            run_end = max(run_end, a + slots[a])
        segments.append((total, arena.buf[run_start:run_end]))  # type: ignore[union-attr]
        total += run_end - run_start
    for i, a in in_arena:
        off_col[i] = a + shift[a]
    placed: list[int] = []
    for raw in extra:
        placed.append(total)
        segments.append((total, raw))
        total += raw.size
    for i, k in others:
        off_col[i], nbytes_col[i] = placed[k], extra[k].size
    return off_col, nbytes_col, segments, total


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
        self._layouts: dict[tuple, int] = {}  # (record, shape) -> row of self._layout_rows
        self._layout_rows = np.zeros(64, dtype=_LAYOUT_DTYPE)
        self._n_entries = 0
        self._n_steps = 0
        self._json_tables: dict[str, h5py.Dataset] = {}  # /optimizer, /reach: at their first row
        self._step_row = np.zeros(1, dtype=STEP_DTYPE)
        self._stage = np.zeros(WRITE_BYTES, dtype=np.uint8)  # small values, gathered
        self._last_step_bytes = 0
        self._spare = 0  # bytes that may be written before free space is checked again
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
        self._append_entries = _Appender(self._entries, _ENTRY_MTYPE)
        self._append_step = _Appender(self._steps, _STEP_MTYPE)
        f.flush()
        self._reserver = Reserver(self._vfd())

    def _vfd(self) -> Optional[int]:
        """HDF5's own descriptor of the file (its default ``sec2`` driver), if it is this
        file's and file offsets are HDF5's addresses (no user block); else None."""
        try:
            if self._file.userblock_size:
                return None
            fd = self._file.id.get_vfd_handle()
            if not isinstance(fd, int):
                return None
            a, b = os.fstat(fd), os.stat(self.path)
            return fd if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else None
        except Exception:  # another driver, or no handle: no reservation
            return None

    # -- one step -----------------------------------------------------------------------
    def write_step(
        self,
        step: int,
        entries: Sequence[EntryData],
        optimizer: Optional[list] = None,
        arena: Optional[Arena] = None,
        reach: Optional[dict] = None,
    ) -> int:
        """Append one complete step, flush, and mark it complete. Returns bytes of values.

        ``optimizer``: the changes of the optimizer settings at this step (``/optimizer``).
        ``arena``: the step's staging buffer, where the recorder copied the values it keeps;
        entries whose values lie in it are written from it in a few large pieces.
        ``reach``: backward passes per parameter at this step, when they changed (``/reach``).
        """
        entries = sorted(entries, key=lambda e: (CAUSAL_RANK.get(e.kind, 99), e.seq))
        rows, new_records, segments, offset = self._rows(step, entries, arena)
        grow = offset + rows.nbytes + _STEP_SLACK
        if grow > self._spare:
            self._spare = self._check_space(offset)
        self._spare -= grow
        if new_records:
            recs = np.zeros(len(new_records), dtype=RECORD_DTYPE)
            for i, (kind, name, call, dtype) in enumerate(new_records):
                recs[i] = (kind.encode(), name, call, dtype.encode())
            n = self._records.shape[0]
            self._records.resize((n + len(recs),))
            self._records[n:] = recs
        start = self._n_entries
        if len(rows):
            self._append_entries(rows, start)
        if segments is not None:
            self._write_values(f"{step:08d}", segments, offset)
        if optimizer:
            self._write_optimizer(step, optimizer)
        if reach is not None:
            self._write_json_row("reach", step, reach)
        self._n_entries = start + len(rows)
        row = self._step_row
        row[0] = (step, start, self._n_entries, 0 if segments is None else 1, time.time())
        self._append_step(row, self._n_steps)
        self._n_steps += 1
        self._file.flush()  # the commit: after this, the step survives kill -9
        self._last_step_bytes = offset + rows.nbytes
        return offset

    def _write_optimizer(self, step: int, changes: list) -> None:
        """One ``/optimizer`` row: the step and its settings changes as JSON (before the
        commit marker, so a row whose step is not committed is ignored by readers)."""
        self._write_json_row("optimizer", step, changes)

    def _write_json_row(self, table: str, step: int, payload: Any) -> None:
        """One row (step, JSON) of a changes-only table (``/optimizer``, ``/reach``), made at
        its first row."""
        ds = self._json_tables.get(table)
        if ds is None:
            ds = self._json_tables[table] = self._file.create_dataset(
                table, (0,), dtype=OPTIMIZER_DTYPE, maxshape=(None,), chunks=(64,)
            )
        n = ds.shape[0]
        ds.resize((n + 1,))
        row = np.zeros(1, dtype=OPTIMIZER_DTYPE)
        row[0] = (step, json.dumps(payload, sort_keys=True, default=str))
        ds[n:] = row

    def _rows(
        self, step: int, entries: Sequence[EntryData], arena: Optional[Arena] = None
    ) -> tuple[np.ndarray, list, Optional[list], int]:
        """The step's entry rows, built column-wise (one numpy assignment per column), the
        step's values as (file offset, bytes) segments back to back (None: no values), and
        their total size.

        What a row takes from its record and shape (record id, ndim, padded shape, numel, the
        clipped flag) is computed once per distinct (record, shape) into a row of a table: a
        training loop repeats the same records step after step, so a step costs one dict
        lookup per entry, one gather from that table and the column assignments.
        """
        n = len(entries)
        rows = np.zeros(n, dtype=ENTRY_DTYPE)
        new_records: list[tuple[str, str, int, str]] = []
        if not n:
            return rows, new_records, None, 0
        layouts = self._layouts
        if len(layouts) + n > _MAX_LAYOUTS:  # shapes that change every step: stay bounded
            layouts.clear()  # (never within a step: ``index`` points into the table)
        index = []
        for e in entries:
            key = (e.kind, e.name, e.call, e.dtype, e.shape)
            i = layouts.get(key)
            if i is None:
                i = self._layout(e, key, new_records)
            index.append(i)
        lay = self._layout_rows[index]
        flags = lay["flags"] | np.array([e.flags for e in entries], dtype=np.uint8)
        placement = _place_values(entries, arena)
        segments, offset = (None, 0) if placement is None else placement[2:]
        rows["step"] = step
        rows["record"] = lay["record"]
        rows["seq"] = [e.seq for e in entries]
        rows["ndim"] = lay["ndim"]
        rows["shape"] = lay["shape"]
        rows["numel"] = lay["numel"]
        fps = np.array([e.fingerprint for e in entries], dtype=np.uint64)
        rows["fp_sum"], rows["fp_pos"] = fps[:, 0], fps[:, 1]
        stats = np.array([e.stats for e in entries], dtype=np.float64)
        rows["norm"], rows["mean"], rows["min"], rows["max"] = stats[:, :4].T
        rows["nan"], rows["inf"] = stats[:, 4], stats[:, 5]  # counts: exact in float64
        if placement is None:
            rows["offset"] = -1
        else:
            rows["offset"] = placement[0]
            rows["nbytes"] = placement[1]
            flags[rows["offset"] >= 0] |= FLAG_VALUES
        rows["flags"] = flags
        return rows, new_records, segments, offset

    def _layout(self, e: EntryData, key: tuple, new_records: list) -> int:
        """The row of ``self._layout_rows`` holding (record id, ndim, shape padded to
        MAX_NDIM, numel, extra flags) of an entry, cached under ``key`` (its record and shape);
        a new record is appended to ``new_records``."""
        rkey = (e.kind, e.name, int(e.call), e.dtype)
        rid = self._record_ids.get(rkey)
        if rid is None:
            rid = self._record_ids[rkey] = len(self._record_ids)
            new_records.append(rkey)
        shape = tuple(int(d) for d in e.shape)
        numel = 1
        for d in shape:
            numel *= d
        clipped = 0
        if len(shape) > MAX_NDIM:
            shape, clipped = (numel,), FLAG_NDIM_CLIPPED
        i = len(self._layouts)
        if i == len(self._layout_rows):
            self._layout_rows = np.resize(self._layout_rows, 2 * i)
        self._layout_rows[i] = (rid, len(shape), clipped, shape + _SHAPE_PAD[len(shape)], numel)
        self._layouts[key] = i
        return i

    def _write_values(self, name: str, segments: list[tuple[int, np.ndarray]], total: int) -> None:
        """One contiguous dataset per step (the cheapest HDF5 layout, FIELD-NOTES 8), written
        in pieces of at most ``WRITE_BYTES`` straight from the values' memory; runs of small
        segments are gathered into one reused staging buffer first. The dataset's space is
        allocated at its creation and, from ``RESERVE_BYTES`` up, reserved in the file system
        in one call before the writes (``graddiff.falloc``)."""
        dsid = h5d.create(
            self._values.id, name.encode(), _U8, h5s.create_simple((total,)), dcpl=_VALUES_DCPL
        )
        if total >= RESERVE_BYTES:
            offset = dsid.get_offset()
            if offset is not None:
                self._reserver.reserve(offset, total)
        fspace = dsid.get_space()
        stage = self._stage
        staged_from = staged = 0

        def put(off: int, arr: np.ndarray) -> None:
            fspace.select_hyperslab((off,), (arr.size,))
            dsid.write(h5s.create_simple((arr.size,)), fspace, arr, _U8)

        for off, arr in segments:
            size = arr.size
            if size < STAGE_BYTES:
                if staged and staged + size > stage.size:
                    put(staged_from, stage[:staged])
                    staged = 0
                if not staged:
                    staged_from = off
                stage[staged : staged + size] = arr
                staged += size
                continue
            if staged:
                put(staged_from, stage[:staged])
                staged = 0
            for k in range(0, size, WRITE_BYTES):
                put(off + k, arr[k : k + WRITE_BYTES])
        if staged:
            put(staged_from, stage[:staged])

    def _check_space(self, value_bytes: int) -> int:
        """Raise WriteFailed when a step of ``value_bytes`` would leave too little room (free
        space, ``ulimit -f``); else return the bytes that can be written before the next
        check (at most ``RECHECK_BYTES``)."""
        need = value_bytes + 2 * self._last_step_bytes + MIN_FREE_BYTES
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        except OSError:
            return RECHECK_BYTES
        if free < need:
            raise WriteFailed(
                f"only {free / 2**20:.0f} MiB free on the disk of {self.path}; "
                f"recording stopped to keep the file readable"
            )
        spare = min(free - need, RECHECK_BYTES)
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        except (ImportError, ValueError, OSError):
            return spare
        if soft != resource.RLIM_INFINITY:
            size = os.path.getsize(self.path)
            need = size + value_bytes + 2 * self._last_step_bytes + 2**20
            if need > soft:
                raise WriteFailed(
                    f"{self.path} would exceed the process file-size limit "
                    f"(ulimit -f, {soft} bytes); recording stopped"
                )
            spare = min(spare, soft - need)
        return spare

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
            what, step, payload, extra = item
            arena = extra.get("arena") if what == "step" and extra else None
            if self._failure is not None:
                if arena is not None:
                    arena.release()
                continue
            t0 = time.perf_counter()
            try:
                if what == "attr":
                    self._writer.set_attr(*payload)
                    continue
                resolved = [e.resolve() for e in payload]
                # keywords only when given: wrappers of write_step keep working
                self.bytes_written += self._writer.write_step(step, resolved, **(extra or {}))
                self.steps_written += 1
            except WriteFailed as exc:
                self._failure = str(exc)
            except Exception as exc:  # any I/O error: stop recording, keep training
                self._failure = (
                    f"writing step {step} to {self._writer.path} failed: {_one_line(exc)}"
                )
            finally:
                if arena is not None:  # its bytes are written (or dropped): reusable
                    arena.release()
                self.write_seconds += time.perf_counter() - t0

    def submit(
        self,
        step: int,
        entries: list,
        optimizer: Optional[list] = None,
        arena: Optional[Arena] = None,
        reach: Optional[dict] = None,
    ) -> None:
        """Queue a finished step (with its optimizer settings changes, if any, and the arena
        its kept values were copied into, if any). After a
        failure, steps are dropped and one warning is given."""
        self.warn_if_failed()
        if arena is not None:
            arena.seal()
        if self._failure is None:
            extra: dict[str, Any] = {}
            if optimizer:
                extra["optimizer"] = optimizer
            if arena is not None:
                extra["arena"] = arena
            if reach is not None:
                extra["reach"] = reach
            self._queue.put(("step", step, entries, extra))
        elif arena is not None:
            arena.release()

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
