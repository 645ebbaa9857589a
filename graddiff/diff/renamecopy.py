"""The fast path of the mapping stage: B copied byte for byte, then renamed and renumbered.

When no rule transforms values (renames only, or only a step offset), rewriting B step by step
(mapped.py) would cost a few HDF5 calls per step; here the file is copied whole and only its
small tables change: record names in ``/records``, step numbers in ``/steps`` and ``/entries``
and the names of the ``/values/<step>`` datasets, and ``/steps`` is cut to ``--steps-b``. The
result is a trace in the same format (graddiff.format) that the differ reads like any other.
"""

from __future__ import annotations

import json
import shutil
from typing import Optional

import h5py
import numpy as np

from ..reader import RecordKey, Run
from .namemap import Match
from .optcopy import copy_settings, param_renames
from .reachcopy import copy_reach


def copy_renamed(
    b: Run,
    matches: dict[RecordKey, Match],
    path: str,
    offset: int,
    window_b: Optional[tuple[Optional[int], Optional[int]]],
    options: dict,
) -> int:
    """Write B to ``path`` under the matched names, steps shifted; returns the steps kept."""
    shutil.copyfile(b.path, path)
    with h5py.File(path, "r+") as f:
        rec = f["records"][:]
        changed = False
        for i in range(len(rec)):
            key = b.record_key(i)
            m = matches.get(key)
            if m is not None and m.rule is not None and m.targets[0] != key.name:
                rec[i]["name"] = m.targets[0]
                changed = True
        if changed:
            f["records"][...] = rec
        steps = f["steps"][:]
        lo, hi = window_b if window_b is not None else (None, None)
        keep = np.ones(len(steps), bool)
        if lo is not None:
            keep &= steps["step"] >= lo
        if hi is not None:
            keep &= steps["step"] <= hi
        steps = steps[keep]
        if offset:
            ent = f["entries"]
            n = int(steps["stop"].max()) if len(steps) else 0
            if n:
                col = ent[:n]
                col["step"] += offset
                ent[:n] = col
            # rename /values/<step>: drop the steps cut away, then move in two passes so
            # that no name is taken while moving
            kept = {f"{int(x):08d}" for x in steps["step"]}
            values = f.get("values")
            names = list(values.keys()) if isinstance(values, h5py.Group) else []
            for name in names:
                if name not in kept:
                    del values[name]
            moved = [n for n in names if n in kept]
            for name in moved:
                values.move(name, f"tmp-{name}")
            for name in moved:
                values.move(f"tmp-{name}", f"{int(name) + offset:08d}")
            steps["step"] += offset
        f["steps"].resize((len(steps),))
        if len(steps):
            f["steps"][...] = steps
        rename = param_renames(matches)
        if offset or rename:
            copy_settings(b, f, offset, rename)
            copy_reach(b, f, offset, rename)
        f.attrs["options"] = json.dumps(options, sort_keys=True, default=str)
    return int(len(steps))
