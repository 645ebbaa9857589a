"""Read a trace file: ``graddiff.open(path)`` returns a read-only :class:`Run`.

Data flow: HDF5 (layout in ``graddiff.format``) --> Run --> differ, post-mortem commands, users.
Only steps covered by the commit marker (``/steps``) are visible. Every failure to read becomes a
one-line :class:`~graddiff.errors.TraceFileError` naming the file. Never imports torch.
"""

from __future__ import annotations

import json
import os
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
    RECORD_DTYPE,
    STEP_DTYPE,
    decode_values,
    fingerprint_bytes,
    storage_dtype,
)
from .kinds import CAUSAL_RANK

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


def _check_table(f: h5py.File, name: str, dtype: np.dtype, path: str) -> h5py.Dataset:
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise TraceFileError(path, f"corrupt graddiff file: the '{name}' table is missing")
    if ds.ndim != 1 or ds.dtype.names != dtype.names:
        raise TraceFileError(
            path, f"corrupt graddiff file: the '{name}' table has the wrong layout"
        )
    return ds


class Run:
    """A recorded training run, read-only. Open with :func:`graddiff.open`."""

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        p = self.path
        if not os.path.exists(p):
            raise TraceFileError(p, "no such file")
        if os.path.isdir(p):
            raise TraceFileError(p, "is a directory, not a trace file")
        try:
            self._file = h5py.File(p, "r")
        except BlockingIOError:
            raise TraceFileError(
                p, "locked: a running trace is still writing it; wait for the trace to finish"
            ) from None
        except Exception as exc:  # OSError for truncated/non-HDF5 files, and friends
            if os.path.getsize(p) == 0:
                raise TraceFileError(p, "empty file, not a graddiff trace") from None
            raise TraceFileError(
                p, f"not a readable HDF5 file (truncated or not a graddiff trace: {_short(exc)})"
            ) from None
        try:
            self._load_index()
        except TraceFileError:
            self._file.close()
            raise
        except Exception as exc:  # corrupt metadata: KeyError, ValueError, MemoryError, ...
            self._file.close()
            raise TraceFileError(p, f"corrupt graddiff file ({_short(exc)})") from None

    # -- loading ---------------------------------------------------------------------------
    def _load_index(self) -> None:
        f, p = self._file, self.path
        marker = f.attrs.get("graddiff_format")
        if isinstance(marker, bytes):
            marker = marker.decode()
        if marker != FORMAT_MARKER:
            raise TraceFileError(
                p,
                "not a graddiff file (no 'graddiff_format' attribute); "
                "record one with graddiff.trace(model, path)",
            )
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise TraceFileError(
                p,
                f"written in trace format {version}, newer than this graddiff reads "
                f"({FORMAT_VERSION}); upgrade graddiff",
            )
        if version < 1:
            raise TraceFileError(p, "corrupt graddiff file: bad 'format_version'")
        try:
            self.environment: dict[str, Any] = json.loads(f.attrs.get("environment", "{}"))
            self.options: dict[str, Any] = json.loads(f.attrs.get("options", "{}"))
        except (TypeError, ValueError):
            raise TraceFileError(p, "corrupt graddiff file: unreadable metadata") from None
        self.status: str = str(f.attrs.get("status", "unknown"))
        self.values_note: str = str(f.attrs.get("values_note", ""))
        self.graddiff_version: str = str(f.attrs.get("graddiff_version", "?"))
        self.created: str = str(f.attrs.get("created", ""))

        self._entries_ds = _check_table(f, "entries", ENTRY_DTYPE, p)
        records = _check_table(f, "records", RECORD_DTYPE, p)[:]
        steps = _check_table(f, "steps", STEP_DTYPE, p)[:]
        n_entries = self._entries_ds.shape[0]
        if len(steps) and (
            np.any(steps["start"] < 0)
            or np.any(steps["stop"] < steps["start"])
            or int(steps["stop"].max()) > n_entries
            or np.any(np.diff(steps["step"]) <= 0)
        ):
            raise TraceFileError(p, "corrupt graddiff file: the step index is inconsistent")
        self._step_rows = steps
        self.steps: np.ndarray = steps["step"].astype(np.int64)
        self._committed_entries = int(steps["stop"].max()) if len(steps) else 0

        self._keys: list[RecordKey] = []
        self._dtypes: list[str] = []
        self._ids_by_key: dict[RecordKey, list[int]] = {}
        for rid, rec in enumerate(records):
            name = rec["name"].decode() if isinstance(rec["name"], bytes) else str(rec["name"])
            key = RecordKey(rec["kind"].decode(), name, int(rec["call"]))
            self._keys.append(key)
            self._dtypes.append(rec["dtype"].decode())
            self._ids_by_key.setdefault(key, []).append(rid)
        self._step_pos = {int(s): i for i, s in enumerate(self.steps)}
        self._ordered_keys = sorted(
            self._ids_by_key, key=lambda k: (CAUSAL_RANK.get(k.kind, 99), self._ids_by_key[k][0])
        )

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
        try:
            out = self._entries_ds[lo:hi]
        except Exception as exc:
            raise TraceFileError(
                self.path, f"corrupt graddiff file: cannot read entries ({_short(exc)})"
            ) from None
        return out

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
        row = self._step_rows[pos]
        ents = self._entries_ds[int(row["start"]) : int(row["stop"])]
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
        rid = int(e["record"])
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
        nbytes, offset = int(e["nbytes"]), int(e["offset"])
        expected = (
            int(np.prod(shape)) * storage_dtype(dtype).itemsize
            if shape
            else storage_dtype(dtype).itemsize
        )
        ds = self._file.get(f"values/{step:08d}")
        if (
            not isinstance(ds, h5py.Dataset)
            or nbytes != expected
            or offset < 0
            or offset + nbytes > ds.shape[0]
        ):
            raise TraceFileError(
                self.path, f"corrupt graddiff file: values of {key} at step {step} are out of range"
            )
        try:
            raw = ds[offset : offset + nbytes]
        except Exception as exc:
            raise TraceFileError(
                self.path, f"corrupt graddiff file: cannot read values ({_short(exc)})"
            ) from None
        if fingerprint_bytes(raw) != (int(e["fp_sum"]), int(e["fp_pos"])):
            raise TraceFileError(
                self.path,
                f"corrupt graddiff file: values of {key} at step {step} do not match their fingerprint",
            )
        return decode_values(raw, dtype, shape)

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
