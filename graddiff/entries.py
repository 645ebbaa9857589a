"""One captured tensor as the writer receives it, and a numpy builder for it.

The recorder produces entries from torch tensors (``graddiff.hooks.snapshot``); tests and tools
that build traces without torch use :func:`entry_from_array`. Either way the writer sees the
same plain data, so it never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .format import fingerprint_bytes

Stats = tuple[float, float, float, float, int, int]  # norm, mean, min, max, nan, inf


@dataclass
class EntryData:
    """A finished record of one tensor at one step."""

    kind: str
    name: str
    call: int
    dtype: str  # torch spelling: "float32", "bfloat16", "int64", ...
    shape: tuple[int, ...]
    stats: Stats
    fingerprint: tuple[int, int]
    values: Optional[np.ndarray] = None  # raw bytes (any dtype, C order) or None
    flags: int = 0
    seq: int = 0

    def resolve(self) -> EntryData:
        """Entries that finish in the writer thread override this; plain data is final."""
        return self


def array_stats(arr: np.ndarray) -> Stats:
    """Summary stats of an array, NaN/Inf-aware, computed like the torch side does."""
    a = np.asarray(arr)
    if a.dtype == np.bool_ or a.dtype.kind in "iu":
        a = a.astype(np.float64)
    if a.dtype.kind == "c":
        a = np.abs(a)
    if a.size == 0:
        return (0.0, 0.0, 0.0, 0.0, 0, 0)
    nan = int(np.isnan(a).sum())
    inf = int(np.isinf(a).sum())
    finite = a[np.isfinite(a)] if (nan or inf) else a
    norm = float(np.linalg.norm(a.astype(np.float64).ravel()))
    mean = float(a.astype(np.float64).mean())
    lo = float(finite.min()) if finite.size else float("nan")
    hi = float(finite.max()) if finite.size else float("nan")
    return (norm, mean, lo, hi, nan, inf)


_NP_TO_TORCH_NAME = {
    "float64": "float64",
    "float32": "float32",
    "float16": "float16",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
    "complex64": "complex64",
    "complex128": "complex128",
}


def entry_from_array(
    kind: str,
    name: str,
    arr: np.ndarray,
    *,
    call: int = 0,
    seq: int = 0,
    store_values: bool = True,
    flags: int = 0,
) -> EntryData:
    """Build an entry from a numpy array (synthetic traces, tests, converters)."""
    a = np.asarray(arr)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    try:
        dtype = _NP_TO_TORCH_NAME[a.dtype.name]
    except KeyError:
        raise ValueError(f"unsupported numpy dtype {a.dtype}") from None
    return EntryData(
        kind=str(kind),
        name=name,
        call=call,
        dtype=dtype,
        shape=tuple(a.shape),
        stats=array_stats(a),
        fingerprint=fingerprint_bytes(a),
        values=a if store_values else None,
        flags=flags,
        seq=seq,
    )
