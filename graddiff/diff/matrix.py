"""The per-step, per-record relative difference of two runs: the data behind the heatmap.

Computed on demand (``Report.divergence_matrix()``), in a second pass over the cells, so that
the comparison itself keeps memory independent of the runs' length.
"""

from __future__ import annotations

import numpy as np

from ..reader import open_run
from .align import align
from .compare_records import DIFF, EQUAL, STATS, classify
from .first import BLOCK_STEPS
from .pair import RunPair


def divergence_matrix(
    path_a: str, path_b: str, kinds: tuple[str, ...], steps: np.ndarray
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps, labels, rel[n_steps, n_labels]).

    rel is 0 where bitwise equal, exact where both runs stored full values, else the statistics'
    lower bound; NaN where a record is absent or not comparable (shape, NaN/Inf placement, or
    summed/joined calls without values whose statistics agree within rounding).
    """
    with open_run(path_a) as a, open_run(path_b) as b:
        al = align(a, b, kinds)
        pair = RunPair(a, b, al, steps)
        rel = np.full((len(steps), len(al.slots)), np.nan)
        row_of = {int(s): i for i, s in enumerate(steps)}
        try:
            for lo in range(0, len(steps), BLOCK_STEPS):
                block = steps[lo : lo + BLOCK_STEPS]
                ea = a.entries(int(block[0]), int(block[-1]))
                eb = b.entries(int(block[0]), int(block[-1]))
                c = classify(a, b, al, pair.dtypes, block, ea, eb)
                unsure = (c.code == STATS) & c.loose & ~c.proven & (c.rel_lb == 0)
                comparable = np.isin(c.code, (DIFF, STATS)) & ~unsure
                val = np.where(c.code == EQUAL, 0.0, np.where(comparable, c.rel_lb, np.nan))
                for i in np.flatnonzero(c.code == DIFF):
                    slot, step = al.slots[int(c.slot[i])], int(c.step[i])
                    vd = pair.diff(slot, step, ea, eb, floor=float(c.floor[i]))
                    if vd is not None:
                        val[i] = vd.rel_diff
                rows = np.array([row_of[int(s)] for s in c.step], np.int64)
                rel[rows, c.slot] = val
        finally:
            pair.close()
        return np.asarray(steps, np.int64), [s.label for s in al.slots], rel
