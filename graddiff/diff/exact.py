"""Element-level comparison of two tensors from full values: the differ's exact stage.

Cells (from fingerprints and stats) say where to look; this module reads a slot's full values
at one step (joining or summing its calls as the alignment says) and measures the difference:
relative error, max abs diff, where the largest difference is, which fraction of elements differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .align import MODE_CONCAT, MODE_ONE


@dataclass
class ValueDiff:
    """The difference of two arrays of one shape."""

    bitwise_equal: bool
    rel_diff: float
    max_abs_diff: float
    index: Optional[list[int]]
    fraction_differing: float
    a_value: Optional[float]
    b_value: Optional[float]
    nonfinite_mismatch: bool
    n_nonfinite_mismatch: int = 0
    diff_norm: float = 0.0  # ||a - b|| over elements finite in both
    scale: float = 0.0  # max(||a||, ||b||)

    def with_floor(self, floor: float) -> ValueDiff:
        """Apply a noise floor to the denominator: rel = ||a-b|| / max(||a||, ||b||, floor)."""
        den = max(self.scale, floor)
        if not self.bitwise_equal and den > 0:
            self.rel_diff = self.diff_norm / den
        return self


def combine(get: Callable[[np.void], np.ndarray], rows: np.ndarray, mode: int) -> np.ndarray:
    """Read the rows' full values and combine them (one / joined on dim 0 / summed in call order).

    Raises:
        ValuesNotStoredError: a row holds statistics only.
    """
    parts = [get(r) for r in rows]
    if len(parts) == 1 or mode == MODE_ONE:
        return parts[0]
    if mode == MODE_CONCAT:
        return np.concatenate([np.atleast_1d(p) for p in parts], axis=0)
    # MODE_SUM
    total = parts[0].copy()
    for p in parts[1:]:
        total = total + p  # in the stored dtype and call order, as autograd accumulates
    return total


def _as_float(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "c":
        return x.astype(np.complex128)
    return x.astype(np.float64)


def compare_values(a: np.ndarray, b: np.ndarray) -> ValueDiff:
    """Compare two arrays of the same shape (dtype may differ: compared as float64).

    Relative difference = ||a - b|| / max(||a||, ||b||) over the elements finite in both; NaN/Inf
    at different places (or Inf of different sign) is a ``nonfinite_mismatch``.
    """
    bitwise = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if bitwise:
        return ValueDiff(True, 0.0, 0.0, None, 0.0, None, None, False)
    fa, fb = _as_float(a).reshape(-1), _as_float(b).reshape(-1)
    na, nb = np.isnan(fa), np.isnan(fb)
    ia, ib = np.isinf(fa), np.isinf(fb)
    bad = (na != nb) | (ia != ib) | (ia & ib & (fa != fb))
    finite = np.isfinite(fa) & np.isfinite(fb)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(fa - fb)
        d = np.where(finite, d, 0.0)
        num = float(np.linalg.norm(d))
        den = max(
            float(np.linalg.norm(np.where(finite, fa, 0))),
            float(np.linalg.norm(np.where(finite, fb, 0))),
        )
    rel = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    same = (fa == fb) | (na & nb)
    i = int(np.argmax(np.where(bad, np.inf, d))) if fa.size else 0
    index = [int(v) for v in np.unravel_index(i, a.shape)] if a.ndim and fa.size else []
    return ValueDiff(
        bitwise_equal=False,
        rel_diff=rel,
        max_abs_diff=float(d.max()) if d.size else 0.0,
        index=index,
        fraction_differing=float(np.count_nonzero(~same)) / max(fa.size, 1),
        a_value=_scalar(fa[i]) if fa.size else None,
        b_value=_scalar(fb[i]) if fb.size else None,
        nonfinite_mismatch=bool(bad.any()),
        n_nonfinite_mismatch=int(bad.sum()),
        diff_norm=num,
        scale=den,
    )


def quick_diff(a: np.ndarray, b: np.ndarray) -> ValueDiff:
    """Only equality and the relative difference (no element detail): the walk's fast path."""
    if a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes():
        return ValueDiff(True, 0.0, 0.0, None, 0.0, None, None, False)
    fa, fb = _as_float(a).reshape(-1), _as_float(b).reshape(-1)
    if not (np.isfinite(fa).all() and np.isfinite(fb).all()):
        return compare_values(a, b)
    num = float(np.linalg.norm(fa - fb))
    den = max(float(np.linalg.norm(fa)), float(np.linalg.norm(fb)))
    rel = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    nan = float("nan")
    return ValueDiff(False, rel, nan, None, nan, None, None, False, 0, num, den)


def _scalar(x: object) -> float:
    v = complex(x) if isinstance(x, complex) else x
    return float(abs(v)) if isinstance(v, complex) else float(v)  # type: ignore[arg-type]


def rel_diff(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """Just the relative difference (finite elements), for diagnosis rules."""
    fa, fb = _as_float(a).reshape(-1), _as_float(b).reshape(-1)
    finite = np.isfinite(fa) & np.isfinite(fb)
    fa, fb = np.where(finite, fa, 0.0), np.where(finite, fb, 0.0)
    num = float(np.linalg.norm(fa - fb))
    den = max(float(np.linalg.norm(fa)), float(np.linalg.norm(fb)), floor)
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
