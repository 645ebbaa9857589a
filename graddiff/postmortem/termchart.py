"""A compact terminal chart of one series (the loss in ``graddiff show``), in block characters.

Pure: values in, lines of text out. Columns are bucket means when there are more steps than
columns; non-finite buckets are drawn as ``!`` on the bottom row. A positive series spanning
more than two decades is drawn on a log10 scale (the axis labels stay in the data's units);
the last line is a legend saying which scale, and what ``!`` means when it appears.
"""

from __future__ import annotations

import numpy as np

_BLOCKS = " ▁▂▃▄▅▆▇█"
#: max/min above this (all values positive) calls for a log scale
LOG_RATIO = 100.0


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def use_log(values: np.ndarray) -> bool:
    """A log scale when every finite value is positive and they span more than two decades."""
    finite = values[np.isfinite(values)]
    return bool(len(finite) and finite.min() > 0 and finite.max() / finite.min() > LOG_RATIO)


def render_chart(
    steps: np.ndarray, values: np.ndarray, *, width: int = 60, height: int = 6, label: str = ""
) -> list[str]:
    """Lines of a bar chart of ``values`` over ``steps``; ``[]`` when there is nothing to draw."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return []
    log = use_log(values)
    width = max(1, min(width, len(values)))
    buckets = np.array_split(np.arange(len(values)), width)
    with np.errstate(all="ignore"):
        shown = np.log10(values) if log else values
        cols = np.array(
            [shown[b].mean() if np.isfinite(shown[b]).all() else np.nan for b in buckets]
        )
    finite = cols[np.isfinite(cols)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 0.0)
    span = hi - lo
    levels = height * 8
    # at least one eighth for the lowest finite bar, so every step shows
    eighths = np.where(
        np.isfinite(cols),
        1 + np.round((cols - lo) / span * (levels - 1)) if span else levels // 2,
        0,
    ).astype(int)
    top_label, bottom_label = (_fmt(10**hi), _fmt(10**lo)) if log else (_fmt(hi), _fmt(lo))
    pad = max(len(top_label), len(bottom_label), len(label))
    lines = []
    for r in range(height):
        floor = (height - 1 - r) * 8  # eighths below this row
        cells = []
        for c, e in zip(cols, eighths):
            if not np.isfinite(c):
                cells.append("!" if r == height - 1 else " ")
            else:
                cells.append(_BLOCKS[int(np.clip(e - floor, 0, 8))])
        tag = (
            top_label if r == 0 else bottom_label if r == height - 1 else (label if r == 1 else "")
        )
        lines.append(f"{tag:>{pad}} ┤{''.join(cells)}".rstrip())
    first, last = str(int(steps[0])), str(int(steps[-1]))
    axis = f"{'':>{pad}} └{first}{last:>{max(1, width - len(first))}}"
    lines.append(axis)
    legend = ["log scale" if log else "linear scale", "x: step"]
    if len(values) > width:
        legend.append(f"each column the mean of ~{len(values) / width:.0f} steps")
    if not np.isfinite(cols).all():
        legend.append("!: NaN/Inf in that column")
    lines.append(f"{'':>{pad}}  " + "; ".join(legend))
    return lines
