"""Read a trace file: ``graddiff.open(path)`` returns a read-only :class:`Run`.

Data flow: HDF5 (layout in ``graddiff.format``) --> Run --> differ, post-mortem commands, users.
Only steps covered by the commit marker (``/steps``) are visible. Every failure to read becomes a
one-line :class:`~graddiff.errors.TraceFileError` naming the file. Never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import h5py
import numpy as np

from .errors import TraceFileError, ValuesNotStoredError
from .format import (
    ENTRY_DTYPE,
    FLAG_VALUES,
    FORMAT_MARKER,
    FORMAT_VERSION,
    MAX_NDIM,
    OPTIMIZER_DTYPE,
    RECORD_DTYPE,
    STEP_DTYPE,
    decode_values,
    fingerprint_bytes,
    storage_dtype,
)
from .heapcheck import check_heaps
from .kinds import CAUSAL_RANK
from .modclass import class_of
from .optimizer_settings import OptimizerSettings, SettingsError

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class RecordKey:
    """Identity of a record across steps and runs."""

    kind: str
    name: str
    call: int = 0

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" + (f" (call {self.call})" if self.call else "")


def _short(exc: BaseException) -> str:
    """First line of an h5py/OS error, without HDF5's stack noise."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


#: Deepest nesting accepted in the JSON metadata (environment, options).
MAX_JSON_DEPTH = 32

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular_file(p: str) -> None:
    """Refuse what is not a regular file before HDF5 opens it (a FIFO would block forever)."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise TraceFileError(p, "no such file") from None
    except (OSError, ValueError) as exc:
        raise TraceFileError(p, f"cannot read ({_short(exc)})") from None
    if not stat.S_ISREG(st.st_mode):
        what = next((w for test, w in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise TraceFileError(p, f"is {what}, not a trace file")
    if st.st_size == 0:
        raise TraceFileError(p, "empty file, not a graddiff trace")


def _same_field(got: np.dtype, want: np.dtype) -> bool:
    """One table column: same kind, width and shape as the format says (byte order aside)."""
    if h5py.check_string_dtype(want) is not None:  # variable-length string
        return h5py.check_string_dtype(got) is not None or got.kind == "S"
    if got.shape != want.shape:
        return False
    g, w = got.base, want.base
    return g.kind == w.kind and g.itemsize == w.itemsize and g.names is None


def _local_object(f: h5py.Group, name: str, path: str) -> object:
    """``f[name]`` if it is a hard link (external and soft links are never followed)."""
    try:
        link = f.get(name, getlink=True)
    except Exception as exc:
        raise TraceFileError(
            path, f"corrupt graddiff file: cannot read '{name}' ({_short(exc)})"
        ) from None
    if link is None:
        return None
    if isinstance(link, h5py.ExternalLink):
        raise TraceFileError(
            path,
            f"refused: '{name}' is an external link to another file (a trace is self-contained)",
        )
    if not isinstance(link, h5py.HardLink):
        raise TraceFileError(path, f"refused: '{name}' is a soft link (a trace has none)")
    try:
        return f[name]
    except Exception as exc:
        raise TraceFileError(
            path, f"corrupt graddiff file: cannot read '{name}' ({_short(exc)})"
        ) from None


def _check_storage(ds: h5py.Dataset, name: str, path: str) -> None:
    """Refuse datasets whose bytes live outside the trace (external raw storage, virtual)."""
    try:
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        external = dcpl.get_external_count()
    except Exception as exc:
        raise TraceFileError(
            path, f"corrupt graddiff file: cannot read '{name}' ({_short(exc)})"
        ) from None
    if layout == h5py.h5d.VIRTUAL:
        raise TraceFileError(path, f"refused: '{name}' is a virtual dataset (a trace has none)")
    if external:
        raise TraceFileError(
            path, f"refused: '{name}' keeps its data in external files (a trace is self-contained)"
        )


def _check_table(f: h5py.File, name: str, dtype: np.dtype, path: str) -> h5py.Dataset:
    ds = _local_object(f, name, path)
    if not isinstance(ds, h5py.Dataset):
        raise TraceFileError(path, f"corrupt graddiff file: the '{name}' table is missing")
    _check_storage(ds, name, path)
    got = ds.dtype
    if (
        ds.ndim != 1
        or got.names != dtype.names
        or not all(_same_field(got.fields[n][0], dtype.fields[n][0]) for n in dtype.names)
    ):
        raise TraceFileError(
            path, f"corrupt graddiff file: the '{name}' table has the wrong layout"
        )
    return ds


def _read(ds: h5py.Dataset, sel: Any, path: str, what: str) -> np.ndarray:
    """``ds[sel]``; any HDF5 failure becomes one TraceFileError line."""
    try:
        return ds[sel]
    except Exception as exc:
        raise TraceFileError(
            path, f"corrupt graddiff file: cannot read {what} ({_short(exc)})"
        ) from None


def _json_attr(f: h5py.File, name: str, path: str) -> dict[str, Any]:
    """A JSON-object attribute (environment, options), shape and depth checked."""
    raw = f.attrs.get(name, "{}")
    if isinstance(raw, (bytes, str)):
        raw = _text(raw)  # undecodable bytes become U+FFFD, never lone surrogates
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict) or _depth(value) > MAX_JSON_DEPTH:
        raise TraceFileError(
            path, f"corrupt graddiff file: unreadable metadata ('{name}' is not a JSON object)"
        )
    return value


def _depth(obj: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    depth, level = 0, [obj]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return depth
        nxt: list[Any] = []
        for o in level:
            if isinstance(o, dict):
                nxt.extend(o.values())
            elif isinstance(o, list):
                nxt.extend(o)
        level = nxt
    return depth


def _str_attr(f: h5py.File, name: str, default: str) -> str:
    return _text(f.attrs.get(name, default))


def _text(v: Any) -> str:
    """A name from the file as valid text (undecodable bytes become U+FFFD)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    v = str(v)
    if v.isascii():
        return v
    return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class Run:
    """A recorded training run, read-only. Open with :func:`graddiff.open`."""

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        p = self.path
        _check_regular_file(p)
        try:
            self._file = h5py.File(p, "r")
        except BlockingIOError:
            raise TraceFileError(
                p, "locked: a running trace is still writing it; wait for the trace to finish"
            ) from None
        except Exception as exc:  # OSError for truncated/non-HDF5 files, and friends
            if "file locking flag values don't match" in str(exc):  # a writer in this process
                raise TraceFileError(
                    p, "locked: a running trace is still writing it; wait for the trace to finish"
                ) from None
            raise TraceFileError(
                p, f"not a readable HDF5 file (truncated or not a graddiff trace: {_short(exc)})"
            ) from None
        try:
            self._load_index()
        except TraceFileError:
            self.close()
            raise
        except Exception as exc:  # corrupt metadata: KeyError, ValueError, MemoryError, ...
            self.close()
            raise TraceFileError(p, f"corrupt graddiff file ({_short(exc)})") from None

    # -- loading ---------------------------------------------------------------------------
    def _load_index(self) -> None:
        f, p = self._file, self.path
        problem = check_heaps(f, p)  # before HDF5 decodes a string: a bad heap loops forever
        if problem:
            raise TraceFileError(p, f"corrupt graddiff file: {problem}")
        marker = f.attrs.get("graddiff_format")
        if isinstance(marker, bytes):
            marker = marker.decode("utf-8", "replace")
        if not isinstance(marker, str) or marker != FORMAT_MARKER:
            raise TraceFileError(
                p,
                "not a graddiff file (no 'graddiff_format' attribute); "
                "record one with graddiff.trace(model, path)",
            )
        version = f.attrs.get("format_version", -1)
        if not isinstance(version, (int, np.integer)) or isinstance(version, bool):
            raise TraceFileError(p, "corrupt graddiff file: bad 'format_version'")
        version = int(version)
        if version > FORMAT_VERSION:
            raise TraceFileError(
                p,
                f"written in trace format {version}, newer than this graddiff reads "
                f"({FORMAT_VERSION}); upgrade graddiff",
            )
        if version < 1:
            raise TraceFileError(p, "corrupt graddiff file: bad 'format_version'")
        self.environment: dict[str, Any] = _json_attr(f, "environment", p)
        self.options: dict[str, Any] = _json_attr(f, "options", p)
        #: module name -> class name (files before 0.1's module_classes: empty)
        self.module_classes: dict[str, Any] = _json_attr(f, "module_classes", p)
        #: module name -> its settings as torch prints them (``extra_repr``; older files: empty)
        self.module_settings: dict[str, str] = {
            str(k): v for k, v in _json_attr(f, "module_settings", p).items() if isinstance(v, str)
        }
        #: alias name -> recorded parameter name (tied weights); None: not recorded (older file)
        self.tied_parameters: Optional[dict[str, str]] = (
            {
                str(k): v
                for k, v in _json_attr(f, "tied_parameters", p).items()
                if isinstance(v, str)
            }
            if "tied_parameters" in f.attrs
            else None
        )
        #: the user's backward hooks on modules and parameters (hooks/reach.py); None: not
        #: recorded (older file)
        self.backward_hooks: Optional[dict[str, Any]] = (
            _json_attr(f, "backward_hooks", p) if "backward_hooks" in f.attrs else None
        )
        #: the user's custom autograd Functions in the first step's graphs: {"names": [...],
        #: "complete": whether every graph was walked whole}; None: not recorded (older file)
        self.custom_functions: Optional[dict[str, Any]] = (
            _json_attr(f, "custom_functions", p) if "custom_functions" in f.attrs else None
        )
        self.status: str = _str_attr(f, "status", "unknown")
        self.values_note: str = _str_attr(f, "values_note", "")
        self.graddiff_version: str = _str_attr(f, "graddiff_version", "?")
        self.created: str = _str_attr(f, "created", "")

        self._entries_ds = _check_table(f, "entries", ENTRY_DTYPE, p)
        records = _read(_check_table(f, "records", RECORD_DTYPE, p), (), p, "the records table")
        steps = _read(_check_table(f, "steps", STEP_DTYPE, p), (), p, "the step index")
        values = _local_object(f, "values", p)
        if values is not None and not isinstance(values, h5py.Group):
            raise TraceFileError(p, "corrupt graddiff file: '/values' is not a group")
        self._values_group: Optional[h5py.Group] = values
        n_entries = self._entries_ds.shape[0]
        if len(steps) and (
            np.any(steps["start"] < 0)
            or np.any(steps["stop"] < steps["start"])
            or int(steps["stop"].max()) > n_entries
            or np.any(np.diff(steps["step"]) <= 0)
            or np.any(steps["start"][1:] < steps["stop"][:-1])
        ):
            raise TraceFileError(p, "corrupt graddiff file: the step index is inconsistent")
        self._step_rows = steps
        self.steps: np.ndarray = steps["step"].astype(np.int64)
        self._committed_entries = int(steps["stop"].max()) if len(steps) else 0
        # Entry rows of one contiguous read [start of a step range, stop) that no step covers.
        self._has_gaps = bool(len(steps) and np.any(steps["start"][1:] != steps["stop"][:-1]))

        self._keys: list[RecordKey] = []
        self._dtypes: list[str] = []
        self._ids_by_key: dict[RecordKey, list[int]] = {}
        for rid, rec in enumerate(records):
            key = RecordKey(_text(rec["kind"]), _text(rec["name"]), int(rec["call"]))
            self._keys.append(key)
            self._dtypes.append(_text(rec["dtype"]))
            self._ids_by_key.setdefault(key, []).append(rid)
        self._step_pos = {int(s): i for i, s in enumerate(self.steps)}
        self._ordered_keys = sorted(
            self._ids_by_key, key=lambda k: (CAUSAL_RANK.get(k.kind, 99), self._ids_by_key[k][0])
        )

    def _validated(self, out: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Entry rows of the step rows ``rows`` (read as one range), checked before anyone
        indexes with them: record ids, steps, shapes, counts. Uncovered rows are dropped."""
        p = self.path
        lo = int(rows["start"].min())
        lengths = (rows["stop"] - rows["start"]).astype(np.int64)
        if self._has_gaps:
            idx = (
                np.concatenate([np.arange(int(r["start"]), int(r["stop"])) for r in rows]).astype(
                    np.int64
                )
                - lo
            )
            out = out[idx] if len(idx) else out[:0]
        want_step = np.repeat(rows["step"], lengths)
        if len(out) != len(want_step):
            raise TraceFileError(
                p, "corrupt graddiff file: the entries table is shorter than its index"
            )
        if not len(out):
            return out
        rec = out["record"]
        bad = None
        if np.any(rec < 0) or np.any(rec >= len(self._keys)):
            bad = "names a record that does not exist"
        elif np.any(out["step"] != want_step):
            bad = "is filed under the wrong step"
        elif np.any(out["ndim"] < 0) or np.any(out["ndim"] > MAX_NDIM):
            bad = "has a bad number of dimensions"
        else:
            dims = np.arange(MAX_NDIM)[None, :] < out["ndim"][:, None]
            shape = np.where(dims, out["shape"], 1)
            if np.any(shape < 0) or np.any(out["numel"] < 0):
                bad = "has a negative size"
            elif (
                np.any(out["nan"] < 0)
                | np.any(out["inf"] < 0)
                | np.any(out["nan"] + out["inf"] > np.maximum(out["numel"], 1))
            ):
                bad = "has impossible NaN/Inf counts"
            else:
                with np.errstate(over="ignore"):
                    numel = np.prod(shape, axis=1, dtype=np.int64)
                    huge = np.any(np.log2(np.maximum(shape, 1)).sum(axis=1) > 62)
                if huge or np.any(numel != out["numel"]):
                    bad = "has a shape that does not match its size"
                else:
                    bad = _bad_value_ranges(out)
        if bad is not None:
            raise TraceFileError(p, f"corrupt graddiff file: an entry row {bad}")
        return out

    # -- context manager ---------------------------------------------------------------------
    def close(self) -> None:
        try:
            self._file.close()
        except Exception:
            pass

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<graddiff.Run {self.path!r}: {len(self.steps)} steps, {len(self.keys)} records>"

    # -- what is in the file -------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True when the recording process closed the file normally."""
        return self.status == "complete"

    @property
    def keys(self) -> list[RecordKey]:
        """Every record key (kind, name, call), in causal order."""
        return list(self._ordered_keys)

    def module_class(self, kind: str, name: str) -> Optional[str]:
        """Class name of the module that owns record ``kind name`` (None if unknown)."""
        return class_of(self.module_classes, kind, name)

    @property
    def kinds(self) -> list[str]:
        present = {k.kind for k in self._keys}
        return sorted(present, key=lambda k: CAUSAL_RANK.get(k, 99))

    def names(self, kind: Optional[str] = None) -> list[str]:
        """Record names (of one kind), in first-seen order."""
        out = [k.name for k in self.keys if kind is None or k.kind == str(kind)]
        return list(dict.fromkeys(out))

    def record_key(self, record_id: int) -> RecordKey:
        return self._keys[record_id]

    def record_dtype(self, record_id: int) -> str:
        return self._dtypes[record_id]

    @property
    def n_records(self) -> int:
        return len(self._keys)

    @property
    def step_table(self) -> np.ndarray:
        """The commit table: step, start, stop (entries rows), full (values stored), time."""
        return self._step_rows

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    # -- entries ---------------------------------------------------------------------------
    def entries(
        self, first_step: Optional[int] = None, last_step: Optional[int] = None
    ) -> np.ndarray:
        """Entry rows (``format.ENTRY_DTYPE``) of the complete steps in [first, last]."""
        rows = self._step_rows
        if first_step is not None:
            rows = rows[rows["step"] >= first_step]
        if last_step is not None:
            rows = rows[rows["step"] <= last_step]
        if not len(rows):
            return np.zeros(0, dtype=ENTRY_DTYPE)
        lo, hi = int(rows["start"].min()), int(rows["stop"].max())
        out = _read(self._entries_ds, np.s_[lo:hi], self.path, "entries")
        return self._validated(out, rows)

    def iter_step_blocks(self, block_steps: int = 256) -> Iterator[np.ndarray]:
        """Entries in blocks of steps: constant memory whatever the trace length."""
        for i in range(0, len(self.steps), block_steps):
            chunk = self.steps[i : i + block_steps]
            yield self.entries(int(chunk[0]), int(chunk[-1]))

    def _entry(self, kind: str, name: str, step: int, call: int) -> tuple[np.void, int]:
        key = RecordKey(str(kind), name, int(call))
        ids = self._ids_by_key.get(key)
        if ids is None:
            near = [k.name for k in self.keys if k.kind == str(kind)][:5]
            hint = f"; {kind} names include {', '.join(near)}" if near else ""
            raise KeyError(f"{self.path}: no record {key}{hint}")
        pos = self._step_pos.get(int(step))
        if pos is None:
            raise KeyError(
                f"{self.path}: step {step} is not a complete step (steps {self._describe_steps()})"
            )
        row = self._step_rows[pos : pos + 1]
        ents = self._validated(
            _read(
                self._entries_ds,
                np.s_[int(row["start"][0]) : int(row["stop"][0])],
                self.path,
                "entries",
            ),
            row,
        )
        hit = ents[np.isin(ents["record"], ids)]
        if not len(hit):
            raise KeyError(f"{self.path}: {key} was not recorded at step {step}")
        return hit[0], int(hit[0]["record"])

    def _describe_steps(self) -> str:
        if not len(self.steps):
            return "none recorded"
        return f"{int(self.steps[0])}..{int(self.steps[-1])}"

    def stats(self, kind: str, name: str, step: int, call: int = 0) -> dict[str, Any]:
        """Shape, dtype, fingerprint and summary stats of one record at one step."""
        e, rid = self._entry(kind, name, step, call)
        return entry_stats(e, self._dtypes[rid])

    def has_values(self, kind: str, name: str, step: int, call: int = 0) -> bool:
        e, _ = self._entry(kind, name, step, call)
        return bool(e["flags"] & FLAG_VALUES)

    def get(self, kind: str, name: str, step: int, call: int = 0) -> np.ndarray:
        """The full values of one record at one step, as a numpy array."""
        e, rid = self._entry(kind, name, step, call)
        return self.values_of(e)

    def values_of(self, e: np.void) -> np.ndarray:
        """Full values of an entry row (verified against its fingerprint)."""
        key, dtype, shape, step, offset, nbytes = self.value_layout(e)
        ds = self.values_dataset(step)
        if offset + nbytes > ds.shape[0]:
            raise TraceFileError(
                self.path, f"corrupt graddiff file: values of {key} at step {step} are out of range"
            )
        raw = _read(ds, np.s_[offset : offset + nbytes], self.path, f"the values of {key}")
        return self.verified(e, raw)

    def value_layout(self, e: np.void) -> tuple[RecordKey, str, tuple[int, ...], int, int, int]:
        """(key, dtype, shape, step, offset, nbytes) of an entry's stored values, checked.

        Raises ValuesNotStoredError for a statistics-only entry, TraceFileError when the row
        does not describe bytes of its dtype and shape.
        """
        rid = int(e["record"])
        if not 0 <= rid < len(self._keys):
            raise TraceFileError(
                self.path, "corrupt graddiff file: an entry row names a record that does not exist"
            )
        key, dtype = self._keys[rid], self._dtypes[rid]
        step = int(e["step"])
        if not e["flags"] & FLAG_VALUES:
            raise ValuesNotStoredError(
                f"{self.path}: {key} at step {step} was recorded as statistics only; "
                f"re-record with graddiff.trace(..., full_steps=[{step}]) for its values"
            )
        ndim = int(e["ndim"])
        if not 0 <= ndim <= MAX_NDIM:
            raise TraceFileError(
                self.path, f"corrupt graddiff file: bad shape of {key} at step {step}"
            )
        shape = tuple(int(s) for s in e["shape"][:ndim])
        try:
            itemsize = storage_dtype(dtype).itemsize
        except ValueError:
            raise TraceFileError(
                self.path,
                f"{key} has dtype {dtype!r}, which this graddiff cannot decode; upgrade graddiff",
            ) from None
        nbytes, offset = int(e["nbytes"]), int(e["offset"])
        if any(s < 0 for s in shape) or nbytes != math.prod(shape) * itemsize or offset < 0:
            raise TraceFileError(
                self.path, f"corrupt graddiff file: values of {key} at step {step} are out of range"
            )
        return key, dtype, shape, step, offset, nbytes

    def values_dataset(self, step: int) -> h5py.Dataset:
        """The ``/values/<step>`` dataset, checked: a local, contiguous 1-D byte array."""
        name = f"{int(step):08d}"
        group = self._values_group
        ds = _local_object(group, name, self.path) if group is not None else None
        if not isinstance(ds, h5py.Dataset):
            raise TraceFileError(
                self.path, f"corrupt graddiff file: values of step {step} are missing"
            )
        _check_storage(ds, f"values/{name}", self.path)
        if ds.ndim != 1 or ds.dtype != np.uint8:
            raise TraceFileError(
                self.path, f"corrupt graddiff file: values of step {step} have the wrong layout"
            )
        return ds

    def verified(self, e: np.void, raw: np.ndarray) -> np.ndarray:
        """Stored bytes of an entry, checked against its fingerprint and decoded."""
        key, dtype, shape, step, _, _ = self.value_layout(e)
        if fingerprint_bytes(raw) != (int(e["fp_sum"]), int(e["fp_pos"])):
            raise TraceFileError(
                self.path,
                f"corrupt graddiff file: values of {key} at step {step} do not match their fingerprint",
            )
        return decode_values(raw, dtype, shape)

    @property
    def optimizer_settings(self) -> OptimizerSettings:
        """The optimizer settings over the committed steps (``/optimizer``; empty when none
        were recorded: manual loops, older files). Read once, on first use."""
        cached = getattr(self, "_optimizer_settings", None)
        if cached is not None:
            return cached
        p = self.path
        rows: list[tuple[int, str]] = []
        if _local_object(self._file, "optimizer", p) is not None:
            table = _read(
                _check_table(self._file, "optimizer", OPTIMIZER_DTYPE, p),
                (),
                p,
                "the optimizer table",
            )
            # rows after the last committed step were written for steps a crash cut off
            last = int(self.steps[-1]) if len(self.steps) else -1
            for row in table:
                step = int(row["step"])
                if step <= last:
                    rows.append((step, _text(row["changes"])))
            rows.sort(key=lambda r: r[0])
        try:
            settings = OptimizerSettings(rows)
        except SettingsError as exc:
            raise TraceFileError(p, f"corrupt graddiff file: optimizer settings: {exc}") from None
        self._optimizer_settings = settings
        return settings

    def reach(self, step: int) -> Optional[dict[str, int]]:
        """How many backward passes accumulated into each parameter's ``.grad`` at ``step``
        (``/reach``; a parameter not listed: none). None when not recorded (older files,
        torch without post-accumulate-grad hooks, gradients not recorded)."""
        rows = self.reach_rows()
        if not rows:
            return None
        at = [r for r in rows if r[0] <= step]
        return at[-1][1] if at else None

    def reach_rows(self) -> list[tuple[int, dict[str, int]]]:
        """The committed ``/reach`` rows, (step, counts) by step; empty when not recorded."""
        rows = getattr(self, "_reach_rows", None)
        if rows is None:
            rows = self._reach_rows = self._read_reach()
        return rows

    def _read_reach(self) -> list[tuple[int, dict[str, int]]]:
        p = self.path
        if _local_object(self._file, "reach", p) is None:
            return []
        table = _read(
            _check_table(self._file, "reach", OPTIMIZER_DTYPE, p), (), p, "the reach table"
        )
        last = int(self.steps[-1]) if len(self.steps) else -1
        rows = []
        for row in table:
            step = int(row["step"])
            if step > last:
                continue  # written for a step a crash cut off
            try:
                counts = json.loads(_text(row["changes"]))
            except (ValueError, RecursionError):
                counts = None
            if not isinstance(counts, dict) or not all(
                isinstance(k, str) and type(v) is int and v >= 0 for k, v in counts.items()
            ):
                raise TraceFileError(p, f"corrupt graddiff file: reach row of step {step}")
            rows.append((step, counts))
        rows.sort(key=lambda r: r[0])
        return rows

    # -- post-mortem (thin delegations to graddiff.postmortem) ------------------------------
    def check(self, **kw: Any) -> Any:
        """Single-run findings (``graddiff check``): a ``postmortem.CheckReport``."""
        from .postmortem.findings import check_run

        return check_run(self, **kw)

    def summary(self) -> dict[str, Any]:
        """What ``graddiff show`` prints, as a dict."""
        from .postmortem.summary import summarize

        return summarize(self)

    def plot(self, path: Optional[PathLike] = None) -> Any:
        """Loss and per-layer norm heatmaps (``graddiff plot``); returns the matplotlib Figure."""
        from .postmortem.plots import plot_run

        return plot_run(self, path)


def _bad_value_ranges(rows: np.ndarray) -> Optional[str]:
    """Why the stored-values ranges of these entry rows are impossible, or None.

    Within one step, each entry's bytes [offset, offset + nbytes) must not overlap another's,
    unless both name the very same range (one tensor recorded under two names). Sorted by
    (step, offset, nbytes), that holds exactly when each range starts at or after the end of
    the one before it in the same step, or repeats it. (Ranges past the end of the step's
    values dataset are refused when the values are read: ``Run.values_of``.)
    """
    v = rows[(rows["flags"] & FLAG_VALUES) > 0]
    if not len(v):
        return None
    step, off, size = v["step"], v["offset"], v["nbytes"]
    if np.any(off < 0) or np.any(size < 0) or np.any(off > (1 << 62) - size):
        return "has stored values out of range"
    order = np.lexsort((size, off, step))
    step, off, size = step[order], off[order], size[order]
    same_step = step[1:] == step[:-1]
    starts_after = off[1:] >= off[:-1] + size[:-1]
    repeats = (off[1:] == off[:-1]) & (size[1:] == size[:-1])
    if np.any(same_step & ~starts_after & ~repeats):
        return "has stored values that overlap another entry's"
    return None


def entry_stats(e: np.void, dtype: str) -> dict[str, Any]:
    """An entry row as a plain dict (what ``Run.stats`` and ``--json`` show)."""
    ndim = int(e["ndim"])
    return {
        "step": int(e["step"]),
        "shape": [int(s) for s in e["shape"][:ndim]],
        "dtype": dtype,
        "numel": int(e["numel"]),
        "fingerprint": f"{int(e['fp_sum']):016x}{int(e['fp_pos']):016x}",
        "norm": float(e["norm"]),
        "mean": float(e["mean"]),
        "min": float(e["min"]),
        "max": float(e["max"]),
        "nan": int(e["nan"]),
        "inf": int(e["inf"]),
        "values_stored": bool(e["flags"] & FLAG_VALUES),
    }


def open_run(path: PathLike) -> Run:
    """Open a trace file read-only. Raises TraceFileError with a one-line message."""
    return Run(path)
