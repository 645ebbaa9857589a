"""Read a step's full values in one HDF5 call and slice them: the differ's fast value path.

``Run.values_of`` costs ~0.5 ms per tensor in HDF5 call overhead, which dominates when a
refactored loop differs by rounding in every step. The walk needs many small tensors of the same
step, so this reader fetches the byte range covering them at once (one call), then decodes and
verifies each tensor's fingerprint exactly as the reader does. Large ranges fall back to
``Run.values_of``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np

from ..errors import TraceFileError, ValuesNotStoredError
from ..format import FLAG_VALUES
from ..reader import Run

#: Read ranges up to this size in one call; bigger steps are read tensor by tensor.
MAX_RANGE_BYTES = 64 * 2**20
_CACHE = 4


class StepValues:
    """Full values of one run's entries, fetched a step at a time (cached for a few steps)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._blobs: OrderedDict[int, tuple[int, np.ndarray]] = OrderedDict()

    def close(self) -> None:
        self._blobs.clear()

    def _dataset(self, step: int):
        return self.run.values_dataset(step)  # checked: local, contiguous bytes

    def prefetch(self, rows: np.ndarray) -> None:
        """Read, in one call per step, the bytes of these rows (those with stored values)."""
        rows = rows[(rows["flags"] & FLAG_VALUES) > 0]
        if not len(rows):
            return
        if rows["step"][0] == rows["step"][-1] and int(rows["step"][0]) in self._blobs:
            return  # the usual case: one step, already read
        for step in np.unique(rows["step"]):
            r = rows[rows["step"] == step]
            lo, hi = int(r["offset"].min()), int((r["offset"] + r["nbytes"]).max())
            if hi - lo > MAX_RANGE_BYTES or lo < 0:
                continue
            have = self._blobs.get(int(step))
            if have is not None and have[0] <= lo and have[0] + len(have[1]) >= hi:
                continue
            ds = self._dataset(int(step))
            if hi > ds.shape[0]:
                raise TraceFileError(
                    self.run.path, f"corrupt graddiff file: values of step {step} are out of range"
                )
            self._blobs[int(step)] = (lo, read_range(ds, lo, hi, self.run.path))
            while len(self._blobs) > _CACHE:
                self._blobs.popitem(last=False)

    def raw(self, step: int, offset: int, nbytes: int) -> Optional[np.ndarray]:
        """Unverified stored bytes from the prefetched range, or None when not prefetched."""
        blob = self._blobs.get(int(step))
        if blob is None or offset < blob[0] or offset + nbytes > blob[0] + len(blob[1]):
            return None
        return blob[1][offset - blob[0] : offset - blob[0] + nbytes]

    def get(self, e: np.void) -> np.ndarray:
        """Full values of an entry row, verified against its fingerprint."""
        step, offset, nbytes = int(e["step"]), int(e["offset"]), int(e["nbytes"])
        blob = self._blobs.get(step)
        if blob is None or not e["flags"] & FLAG_VALUES:
            return self.run.values_of(e)
        lo, data = blob
        if offset < lo or offset + nbytes > lo + len(data):
            return self.run.values_of(e)
        return self.run.verified(e, data[offset - lo : offset - lo + nbytes])


def read_range(ds, lo: int, hi: int, path: str) -> np.ndarray:
    """``ds[lo:hi]``; an HDF5 failure becomes one TraceFileError line."""
    try:
        return ds[lo:hi]
    except Exception as exc:
        raise TraceFileError(path, f"corrupt graddiff file: cannot read values ({exc})") from None


__all__ = ["StepValues", "ValuesNotStoredError"]
