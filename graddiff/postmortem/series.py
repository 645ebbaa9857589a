"""Per-record time series of one run's entry statistics: the input of every single-run check.

Data flow: Run entry table (graddiff.reader) --> one :class:`Series` per record key --> findings,
summary, plots. Reads the entry table in blocks of steps; stored values are not touched here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..format import ENTRY_DTYPE, FLAG_VALUES
from ..reader import RecordKey, Run


@dataclass
class Series:
    """The entry rows (``format.ENTRY_DTYPE``) of one record key, one per step, by step."""

    key: RecordKey
    rows: np.ndarray

    @property
    def steps(self) -> np.ndarray:
        return self.rows["step"]

    @property
    def norm(self) -> np.ndarray:
        return self.rows["norm"]

    @property
    def mean(self) -> np.ndarray:
        return self.rows["mean"]

    @property
    def has_values(self) -> np.ndarray:
        return (self.rows["flags"] & FLAG_VALUES) != 0

    def row_at(self, step: int) -> Optional[np.void]:
        """The entry row at ``step``, or None where this record was not recorded then."""
        i = int(np.searchsorted(self.steps, step))
        if i < len(self.rows) and int(self.rows["step"][i]) == step:
            return self.rows[i]
        return None


def collect_series(run: Run, kinds: Optional[Iterable[str]] = None) -> dict[RecordKey, Series]:
    """Every record's entries grouped by key, in the run's causal key order."""
    wanted = None if kinds is None else {str(k) for k in kinds}
    keys = [k for k in run.keys if wanted is None or k.kind in wanted]
    index = {k: i for i, k in enumerate(keys)}
    # record id -> key position (-1 = not wanted); several ids can share a key (dtype change).
    rid_pos = np.array(
        [index.get(run.record_key(r), -1) for r in range(run.n_records)], dtype=np.int64
    )
    parts = []
    for block in run.iter_step_blocks():
        if len(block) and len(rid_pos):
            parts.append(block[rid_pos[block["record"]] >= 0])
    ents = np.concatenate(parts) if parts else np.zeros(0, dtype=ENTRY_DTYPE)
    if not len(ents):
        return {}
    pos = rid_pos[ents["record"]]
    order = np.lexsort((ents["step"], pos))
    ents, pos = ents[order], pos[order]
    bounds = np.flatnonzero(np.diff(pos)) + 1
    out: dict[RecordKey, Series] = {}
    for chunk_pos, rows in zip(np.split(pos, bounds), np.split(ents, bounds)):
        key = keys[int(chunk_pos[0])]
        out[key] = Series(key, rows)
    return out


def loss_curve(
    run: Run, series: Optional[dict[RecordKey, Series]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, loss): per step, the mean of the ``loss`` entries' means (a scalar's mean is it).

    Several backward calls in one step (micro-batches) are averaged. Empty arrays without losses.
    """
    if series is None:
        series = collect_series(run, kinds=["loss"])
    found = [s for k, s in series.items() if k.kind == "loss" and k.name == "loss"]
    if not found:
        return np.zeros(0, np.int64), np.zeros(0)
    steps = np.concatenate([s.steps for s in found])
    means = np.concatenate([s.mean for s in found])
    uniq, inv = np.unique(steps, return_inverse=True)
    sums = np.zeros(len(uniq))
    counts = np.zeros(len(uniq))
    np.add.at(sums, inv, means)
    np.add.at(counts, inv, 1)
    return uniq.astype(np.int64), sums / counts
