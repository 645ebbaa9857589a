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
from itertools import chain
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


def _hot_dtype() -> np.dtype:
    """A view of an entries row with the columns that change every step grouped by type:
    ``seq_flags`` (a record: seq int32 and flags uint8, at their places), ``fp`` (fp_sum,
    fp_pos), ``f`` (norm, mean, min, max) and ``counts`` (nan, inf), each assigned at once."""
    f = ENTRY_DTYPE.fields
    for a, b in (("fp_sum", "fp_pos"), ("norm", "max"), ("nan", "inf")):
        assert f[b][1] > f[a][1]
    return np.dtype(
        {
            "names": ["seq_flags", "fp", "f", "counts"],
            "formats": [
                np.dtype(
                    {
                        "names": ["seq", "flags"],
                        "formats": ["<i4", "u1"],
                        "offsets": [0, f["flags"][1] - f["seq"][1]],
                        "itemsize": f["flags"][1] - f["seq"][1] + 1,
                    }
                ),
                ("<u8", (2,)),
                ("<f8", (4,)),
                ("<i8", (2,)),
            ],
            "offsets": [f["seq"][1], f["fp_sum"][1], f["norm"][1], f["nan"][1]],
            "itemsize": ENTRY_DTYPE.itemsize,
        }
    )


_HOT_DTYPE = _hot_dtype()


# HDF5 memory types of the two per-step tables, built once (h5py's ``ds[a:b] = rows`` builds
# them, and a selection, on every call: about 150 us per call on a 27-row step).
_ENTRY_MTYPE = h5t.py_create(ENTRY_DTYPE)
_STEP_MTYPE = h5t.py_create(STEP_DTYPE)


def _unwritten_row() -> np.ndarray:
    """The fill value of ``/entries``: rows extended ahead and not yet written (seen only in a
    file cut off by a crash) have step, record and offset -1, so no step's filter matches them."""
    row = np.zeros((), dtype=ENTRY_DTYPE)
    row["step"] = row["record"] = row["offset"] = -1
    return row


_UNWRITTEN_ROW = _unwritten_row()


def _c_h5dwrite() -> Any:
    """HDF5's own ``H5Dwrite`` through ctypes (the library h5py loaded) and h5py's lock, or
    None.

    h5py's ``DatasetID.write`` of a compound type builds a reduced copy of the dataset's type
    and walks both types' members (names, sizes, classes) on every call, about 25 us of CPU
    for the 17-member entries row whatever the row count; HDF5's own write of the same rows
    takes about 4 us (measured, docs/performance.md "Per-record cost"). The call is made
    holding h5py's library lock (``phil``), as h5py's own calls are, so no other thread's
    h5py call overlaps it; ctypes releases the GIL during it. Found by looking the symbol up
    through h5py's extension module (its dependencies include the HDF5 library); None where
    that fails (a platform whose loader does not search dependencies, an HDF5 whose ``hid_t``
    is not 64-bit) or with ``GRADDIFF_NO_CWRITE=1``: h5py's write is used, same bytes."""
    if os.environ.get("GRADDIFF_NO_CWRITE", "") not in ("", "0"):
        return None
    try:
        import ctypes

        import h5py.defs

        if h5py.version.hdf5_version_tuple < (1, 10, 0):  # hid_t became 64-bit in 1.10
            return None
        from h5py._objects import phil

        fn = ctypes.CDLL(h5py.defs.__file__).H5Dwrite
        fn.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return fn, phil
    except Exception:  # no such symbol there, no ctypes, no h5py lock, ...
        return None


_H5DWRITE = _c_h5dwrite()
_H5P_DEFAULT = 0


class _Appender:
    """Appends rows to a 1-D resizable table (h5py's low-level API: the same HDF5 calls as
    ``ds.resize`` + ``ds[n:] = rows``, without their Python layers). It keeps its own file
    dataspace, resized with the table, and a memory dataspace per row count: no
    ``H5Dget_space`` per append, which releases and retakes the GIL (a hand-off the training
    thread pays for) and cost about 5 us. The rows are written by HDF5's ``H5Dwrite``
    directly where it is reachable (``_c_h5dwrite``), else by h5py."""

    def __init__(self, ds: h5py.Dataset, mtype: h5t.TypeID, ahead: int = 0) -> None:
        self._dsid = ds.id
        self._mtype = mtype
        self._space = ds.id.get_space()
        self._extent = ds.shape[0]
        self._ahead = ahead
        self._mem: dict[int, h5s.SpaceID] = {}
        self._c_write = _H5DWRITE

    def __call__(self, rows: np.ndarray, n: int) -> None:
        """Append ``rows`` (C-contiguous, of the table's dtype) to the table, which holds
        ``n`` rows. With ``ahead``, the table is extended ``ahead`` rows beyond what it needs
        when it must grow (one ``H5Dset_extent`` per ``ahead`` rows, not one per call); the
        rows past ``n`` are unwritten (no chunk allocated) until ``trim``."""
        k = rows.shape[0]
        space = self._space
        if n + k > self._extent or not self._ahead:
            self._extent = n + k + self._ahead
            self._dsid.set_extent((self._extent,))
            space.set_extent_simple((self._extent,), (h5s.UNLIMITED,))
        space.select_hyperslab((n,), (k,))
        mem = self._mem.get(k)
        if mem is None:
            if len(self._mem) >= 64:  # row counts that change every step: stay bounded
                self._mem.clear()
            mem = self._mem[k] = h5s.create_simple((k,))
        c_write = self._c_write
        if c_write is not None and rows.flags.c_contiguous:
            with c_write[1]:
                done = c_write[0](
                    self._dsid.id,
                    self._mtype.id,
                    mem.id,
                    space.id,
                    _H5P_DEFAULT,
                    rows.__array_interface__["data"][0],
                )
            if done >= 0:
                return
            # HDF5 refused (its errors are silenced by h5py): h5py's write raises the reason
        self._dsid.write(mem, space, rows, self._mtype)

    def trim(self, n: int) -> None:
        """Cut the table to its ``n`` written rows (at close)."""
        if self._extent != n:
            self._dsid.set_extent((n,))
            self._extent = n
            self._space = self._dsid.get_space()


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
        self._layout_rows = np.zeros(64, dtype=ENTRY_DTYPE)  # template rows
        self._clipped = False  # some template row has FLAG_NDIM_CLIPPED
        self._last_index: list[int] = []  # the last step's template rows, and their bytes
        self._last_raw = np.zeros((0, ENTRY_DTYPE.itemsize), dtype=np.uint8)
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
            "entries",
            (0,),
            dtype=ENTRY_DTYPE,
            maxshape=(None,),
            chunks=(TABLE_CHUNK_ROWS,),
            fillvalue=_UNWRITTEN_ROW,
        )
        self._steps = f.create_dataset(
            "steps", (0,), dtype=STEP_DTYPE, maxshape=(None,), chunks=(TABLE_CHUNK_ROWS,)
        )
        self._values = f.create_group("values")
        self._append_entries = _Appender(self._entries, _ENTRY_MTYPE, ahead=TABLE_CHUNK_ROWS)
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
        """The step's entry rows, built column-wise, the step's values as (file offset, bytes)
        segments back to back (None: no values), and their total size.

        What a row takes from its record and shape (record id, ndim, padded shape, numel, the
        clipped flag) is computed once per distinct (record, shape) into a template row of
        ``self._layout_rows``: a training loop repeats the same records step after step, so a
        step costs one dict lookup per entry, a copy of the last step's rows' bytes where the
        records are the same (else a gather of the template rows) and six column assignments (through ``_HOT_DTYPE``: the fingerprints, the four float statistics and
        the two counts each in one assignment).
        """
        n = len(entries)
        new_records: list[tuple[str, str, int, str]] = []
        if not n:
            return np.zeros(0, dtype=ENTRY_DTYPE), new_records, None, 0
        layouts = self._layouts
        if len(layouts) + n > _MAX_LAYOUTS:  # shapes that change every step: stay bounded
            layouts.clear()  # (never within a step: ``index`` points into the table)
            self._last_index = []
        index = []
        get = layouts.get
        for e in entries:
            key = (e.kind, e.name, e.call, e.dtype, e.shape)
            i = get(key)
            if i is None:
                i = self._layout(e, key, new_records)
            index.append(i)
        if index == self._last_index:  # the same records as the step before: its template
            raw = self._last_raw.copy()
        else:  # a gather of template rows (as bytes: numpy copies records field by field)
            raw = (
                self._layout_rows.view(np.uint8)
                .reshape(-1, ENTRY_DTYPE.itemsize)
                .take(index, axis=0)
            )
            self._last_index, self._last_raw = index, raw.copy()
        rows = raw.view(ENTRY_DTYPE).reshape(n)  # record, ndim, shape, numel, flags set
        hot = rows.view(_HOT_DTYPE)
        rows["step"] = step
        hot["seq_flags"] = [(e.seq, e.flags) for e in entries]
        if self._clipped:  # shapes of more than MAX_NDIM dimensions: their template's flag
            rows["flags"] |= self._layout_rows["flags"][index]
        hot["fp"] = np.fromiter(
            chain.from_iterable([e.fingerprint for e in entries]), np.uint64, 2 * n
        ).reshape(n, 2)
        stats = np.fromiter(
            chain.from_iterable([e.stats for e in entries]), np.float64, 6 * n
        ).reshape(n, 6)
        hot["f"] = stats[:, :4]
        hot["counts"] = stats[:, 4:]  # counts: exact in float64
        placement = _place_values(entries, arena)
        segments, offset = (None, 0) if placement is None else placement[2:]
        if placement is None:
            rows["offset"] = -1
        else:
            rows["offset"] = placement[0]
            rows["nbytes"] = placement[1]
            flags = rows["flags"]
            flags[rows["offset"] >= 0] |= FLAG_VALUES
        return rows, new_records, segments, offset

    def _layout(self, e: EntryData, key: tuple, new_records: list) -> int:
        """The row of ``self._layout_rows`` holding an entry's template row (record id, ndim,
        shape padded to MAX_NDIM, numel, the clipped flag; every other column zero), cached
        under ``key`` (its record and shape); a new record is appended to ``new_records``."""
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
            self._clipped = True
        i = len(self._layouts)
        if i == len(self._layout_rows):
            grown = np.zeros(2 * i, dtype=ENTRY_DTYPE)
            grown[:i] = self._layout_rows
            self._layout_rows = grown
        row = self._layout_rows[i : i + 1]
        row["record"], row["ndim"], row["flags"] = rid, len(shape), clipped
        row["shape"] = [shape + _SHAPE_PAD[len(shape)]]
        row["numel"] = numel
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
            self._append_entries.trim(self._n_entries)  # the rows extended ahead, unwritten
        except Exception:  # a table that cannot shrink now is still read up to its steps
            pass
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
        # Held while a step is written, by the writer thread or (``submit(inline=True)``) by
        # the caller: one writer of the file at a time, steps in order.
        self._writing = threading.Lock()
        self.steps_inline = 0
        self._inline = os.environ.get("GRADDIFF_NO_INLINE_WRITE", "") in ("", "0")
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
            with self._writing:
                if self._failure is not None:
                    if arena is not None:
                        arena.release()
                elif what == "attr":
                    self._set_attr(*payload)
                else:
                    self._write(step, payload, extra, arena)
                self._queue.task_done()  # under the lock: see ``submit``

    def _write(self, step: int, entries: list, extra: Optional[dict], arena: Any) -> None:
        """Write one step (holding ``_writing``); a failure stops recording, never raises."""
        t0 = time.perf_counter()
        try:
            if self._failure is None:
                resolved = [e.resolve() for e in entries]
                # keywords only when given: wrappers of write_step keep working
                self.bytes_written += self._writer.write_step(step, resolved, **(extra or {}))
                self.steps_written += 1
        except WriteFailed as exc:
            self._failure = str(exc)
        except Exception as exc:  # any I/O error: stop recording, keep training
            self._failure = f"writing step {step} to {self._writer.path} failed: {_one_line(exc)}"
        finally:
            if arena is not None:  # its bytes are written (or dropped): reusable
                arena.release()
            self.write_seconds += time.perf_counter() - t0

    def _set_attr(self, key: str, value: str) -> None:
        try:
            if self._failure is None:
                self._writer.set_attr(key, value)
        except Exception as exc:
            self._failure = f"writing to {self._writer.path} failed: {_one_line(exc)}"

    def submit(
        self,
        step: int,
        entries: list,
        optimizer: Optional[list] = None,
        arena: Optional[Arena] = None,
        reach: Optional[dict] = None,
        inline: bool = False,
    ) -> None:
        """Queue a finished step (with its optimizer settings changes, if any, and the arena
        its kept values were copied into, if any). After a
        failure, steps are dropped and one warning is given.

        ``inline``: the caller says the step is ready to write as it is (statistics only, no
        entry waiting on a device): when the writer thread is idle with nothing queued, the
        step is written here, on the calling thread, instead of being handed over. A small
        step costs less CPU written than handed over (the hand-off wakes the writer thread
        and passes the GIL back and forth), and under load far less wall time, since the
        training thread no longer waits for the writer thread to be scheduled
        (docs/performance.md, "Per-record cost"). Steps stay in order and one thread writes
        at a time (``_writing``); a failure is handled as on the writer thread.
        ``GRADDIFF_NO_INLINE_WRITE=1`` hands every step over (for comparisons)."""
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
            idle = inline and self._inline and arena is None and not self._queue.unfinished_tasks
            if idle and self._writing.acquire(blocking=False):
                try:
                    # every step handed over before is written (the writer thread marks an
                    # item done under the lock, so one taken but not yet written still
                    # counts): this one may go next, from here
                    if not self._queue.unfinished_tasks:
                        self._write(step, entries, extra, None)
                        self.steps_inline += 1
                        return
                finally:
                    self._writing.release()
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
