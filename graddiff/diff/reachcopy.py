"""B's backward passes per parameter (``/reach``), backward hooks (``backward_hooks``) and
custom autograd Functions (``custom_functions``) in
the copies written by ``compare --map/--offset``: steps shifted like B's steps, parameter
names mapped like B's records."""

from __future__ import annotations

import json

import h5py
import numpy as np

from ..format import OPTIMIZER_DTYPE
from ..reader import Run


def copy_reach(b: Run, f: h5py.File, offset: int, rename: dict[str, str]) -> None:
    """Write B's ``/reach`` rows, ``backward_hooks`` and ``custom_functions`` into the open
    copy ``f`` (replacing any there; absent in B: absent in the copy)."""
    if "reach" in f:
        del f["reach"]
    rows = b.reach_rows()
    if rows:
        table = np.zeros(len(rows), dtype=OPTIMIZER_DTYPE)
        for i, (step, counts) in enumerate(rows):
            mapped = {rename.get(n, n): c for n, c in counts.items()}
            table[i] = (step + offset, json.dumps(mapped, sort_keys=True))
        f.create_dataset("reach", data=table, maxshape=(None,), chunks=(64,))
    if "backward_hooks" in f.attrs:
        del f.attrs["backward_hooks"]
    hooks = b.backward_hooks
    if hooks is not None:
        hooks = dict(hooks)
        hooks["params"] = {rename.get(n, n): v for n, v in (hooks.get("params") or {}).items()}
        f.attrs["backward_hooks"] = json.dumps(hooks, sort_keys=True)
    if "custom_functions" in f.attrs:
        del f.attrs["custom_functions"]
    if b.custom_functions is not None:
        f.attrs["custom_functions"] = json.dumps(b.custom_functions, sort_keys=True)
