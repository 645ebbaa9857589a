"""Where each rank's shard of a sharded record sits (FSDP2, DTensor): the trace's ``shards``
attribute (graddiff/format.py), and reassembly of full tensors from the shards.

Data flow: rank files --> layouts per rank --> merge (full tensors by fully-qualified name) and
the consistency check (shards differ across ranks by design and are not voted on).
"""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np

from ..errors import TraceFileError
from ..reader import Run

#: Kinds that hold a sharded parameter's layout: the parameter and its gradient.
SHARDED_KINDS = ("param", "grad")


def read_shards(run: Run) -> dict[str, dict[str, Any]]:
    """name -> layout for every sharded parameter of ``run`` ({} for unsharded traces)."""
    try:
        with h5py.File(run.path, "r") as f:
            raw = f.attrs.get("shards", "")
    except OSError as exc:
        raise TraceFileError(run.path, f"cannot read the shard layout ({exc})") from None
    if isinstance(raw, bytes):
        raw = raw.decode()
    if not raw:
        return {}
    try:
        layout = json.loads(raw)
    except ValueError:
        raise TraceFileError(run.path, "corrupt graddiff file: unreadable 'shards'") from None
    if not isinstance(layout, dict):
        raise TraceFileError(run.path, "corrupt graddiff file: bad 'shards'")
    return layout


def empty_piece(layout: dict[str, Any]) -> bool:
    """This rank holds no element of the tensor (FSDP1 records no gradient for it)."""
    rng = layout.get("flat_range")
    return rng is not None and rng[0] == rng[1]


def assemble(parts: list, layouts: list[dict[str, Any]]) -> np.ndarray:
    """The full tensor from every rank's shard placed at its offset, or (FSDP1) at its range
    of the flattened tensor; a rank without a piece passes None. Replicas overwrite with equal
    values. Raises ValueError when the shards do not tile the full shape."""
    shape = tuple(layouts[0]["global_shape"])
    dtype = next((p.dtype for p in parts if p is not None), np.float32)
    full = np.zeros(shape, dtype=dtype)
    covered = np.zeros(shape, dtype=bool)
    for part, lay in zip(parts, layouts):
        if tuple(lay["global_shape"]) != shape:
            raise ValueError("the ranks record different global shapes")
        if part is None or part.size == 0:
            continue
        if "flat_range" in lay:  # FSDP1: elements [start, stop) of the flattened tensor
            start, stop = lay["flat_range"]
            if part.size != stop - start:
                raise ValueError("a flat shard does not match its recorded range")
            full.reshape(-1)[start:stop] = part.reshape(-1)
            covered.reshape(-1)[start:stop] = True
            continue
        idx = tuple(slice(o, o + n) for o, n in zip(lay["offset"], part.shape))
        full[idx] = part
        covered[idx] = True
    if not covered.all():
        raise ValueError("the shards do not cover the full tensor")
    return full
