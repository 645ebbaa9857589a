"""B's optimizer settings (``/optimizer``) in the copies written by ``compare --map/--offset``:
steps shifted like B's steps, parameter names mapped like B's records."""

from __future__ import annotations

import json

import h5py
import numpy as np

from ..format import OPTIMIZER_DTYPE
from ..reader import Run


def _renamed(changes: list, rename: dict[str, str]) -> list:
    for ch in changes:
        for gi, names in (ch.get("params") or {}).items():
            ch["params"][gi] = [rename.get(n, n) for n in names]
        for gi, per in (ch.get("state_steps") or {}).items():
            ch["state_steps"][gi] = {rename.get(n, n): c for n, c in per.items()}
    return changes


def param_renames(matches: dict) -> dict[str, str]:
    """B parameter name -> A's, for parameters a rule maps onto exactly one of A's names (a split
    parameter has no single name in A and keeps its own in the settings)."""
    return {
        key.name: m.targets[0]
        for key, m in matches.items()
        if key.kind == "param" and m.rule is not None and len(m.targets) == 1
    }


def copy_settings(b: Run, f: h5py.File, offset: int, rename: dict[str, str]) -> None:
    """Write B's settings rows into the open copy ``f`` (replacing any there)."""
    if "optimizer" in f:
        del f["optimizer"]
    rows = b.optimizer_settings.rows
    if not rows:
        return
    table = np.zeros(len(rows), dtype=OPTIMIZER_DTYPE)
    for i, (step, text) in enumerate(rows):
        changes = _renamed(json.loads(text), rename) if rename else json.loads(text)
        table[i] = (step + offset, json.dumps(changes, sort_keys=True))
    f.create_dataset("optimizer", data=table, maxshape=(None,), chunks=(64,))
