"""Reserve a file's blocks before writing them: ``fallocate(2)`` with ``FALLOC_FL_KEEP_SIZE``.

Data flow: TraceWriter --(the file range of a step's values dataset)--> reserve --> the
kernel. Writing a step's values into fresh file space made the file system allocate blocks
page by page (ext4's delayed allocation); with the range reserved in one call first the same
write cost the writing thread about a third less CPU (docs/performance.md, "Full mode:
reserved file space"). ``KEEP_SIZE`` leaves the file's size alone: the reserved range lies
inside space HDF5 has already allocated, so the file never looks longer than HDF5 wrote it.

Linux only (``fallocate`` from the C library, through ctypes, which releases the GIL). Where
it does not exist or the file system refuses it (EOPNOTSUPP, no space, ...), ``Reserver``
switches itself off and the writes go on as before: this is an optimisation, never a change
of what is written.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Optional

FALLOC_FL_KEEP_SIZE = 1


def _libc_fallocate() -> Optional[Any]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()


class Reserver:
    """Reserves ranges of one open file, by descriptor; off after the first refusal."""

    def __init__(self, fd: Optional[int]) -> None:
        self.fd = fd if _FALLOCATE is not None else None
        self.reserved = 0  # bytes reserved so far (what the tests and benchmarks look at)
        self.refused: Optional[str] = None

    def reserve(self, offset: int, nbytes: int) -> bool:
        """Reserve ``nbytes`` at ``offset``; False (and off from now on) when refused."""
        if self.fd is None or nbytes <= 0 or offset < 0:
            return False
        if _FALLOCATE(self.fd, FALLOC_FL_KEEP_SIZE, offset, nbytes) != 0:  # type: ignore[misc]
            self.refused = os.strerror(ctypes.get_errno())
            self.fd = None
            return False
        self.reserved += nbytes
        return True
