"""Recover the update rule from recorded series: what each run's optimizer did to a parameter.

Used by the update-rule diagnosis (rules_update.py). Inputs are one parameter's values at two
consecutive steps (``p`` before, ``p + delta`` after), the gradient the update consumed (``g``)
and the previous update (``u``), in float64. Two fits, both least squares:

- :func:`fit_sgd`, per run: ``delta = -lr * (g + wd * p) + mu * u`` (SGD with coupled L2 weight
  decay and momentum; ``u`` is ``-lr * buffer``). When it holds, the run's learning rate, weight
  decay and momentum are read off the coefficients.
- :func:`fit_difference`, across runs (any optimizer, e.g. Adam): the difference of the two
  updates ``e = delta_a - delta_b`` as ``c * delta_b`` (learning rate ratio ``1 + c``),
  ``beta * p`` (decoupled weight decay, ``beta = -lr * (wd_a - wd_b)``) and ``m * u_b``
  (optimizer state: momentum, moments).
- :func:`fresh_adam`: an update that is ``-lr * sign(g)`` element by element, the first step of
  an Adam whose moments start at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Optional

import numpy as np

#: A per-run linear fit holds when its residual is below this fraction of the update
#: (rounding of p + delta in float32 leaves ~1e-7 |p| / |delta|).
FIT_TOL = 1e-3
#: A cross-run fit explains the difference when its residual is below this fraction of it.
EXPLAIN_TOL = 0.05
#: Elements per fitted coefficient below which a fit proves nothing.
MIN_PER_COEF = 4
#: A coefficient differs between runs when the gap exceeds this many standard errors.
SIGNIFICANCE = 6.0


@dataclass
class SgdFit:
    """``delta = -lr * (g + wd * p) + momentum * u``, with standard errors."""

    lr: float
    wd: float
    momentum: Optional[float]  # None: no previous update to fit against
    residual: float
    se: dict  # name -> standard error of lr, wd (as coefficient of p), momentum


def _lstsq(cols: list[np.ndarray], y: np.ndarray) -> Optional[tuple[np.ndarray, float, np.ndarray]]:
    """Coefficients, residual relative to ||y||, standard errors; None when ill-posed."""
    n, k = len(y), len(cols)
    yy = float(y @ y)
    if n < MIN_PER_COEF * k or yy == 0:
        return None
    x = np.stack(cols, axis=1)
    if np.linalg.matrix_rank(x) < k:
        return None
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    r = y - x @ coef
    rss = float(r @ r)
    sigma2 = rss / max(n - k, 1)
    try:
        cov = np.linalg.inv(x.T @ x) * sigma2
    except np.linalg.LinAlgError:
        return None
    return coef, float(np.sqrt(rss / yy)), np.sqrt(np.maximum(np.diag(cov), 0.0))


def fit_sgd(
    delta: np.ndarray, g: np.ndarray, p: np.ndarray, u: Optional[np.ndarray]
) -> Optional[SgdFit]:
    """Fit one run's update as SGD (coupled weight decay, momentum); None when it does not hold."""
    cols = [g, p] + ([u] if u is not None else [])
    got = _lstsq(cols, delta)
    if got is None:
        return None
    coef, res, se = got
    if res > FIT_TOL or coef[0] >= 0:
        return None
    lr = -float(coef[0])
    # a coefficient within its noise of zero is zero (no decay, no momentum), not -4e-8
    coef = np.where(np.abs(coef) > SIGNIFICANCE * se, coef, 0.0)
    return SgdFit(
        lr=lr,
        wd=float(coef[1]) / -lr + 0.0,
        momentum=float(coef[2]) + 0.0 if u is not None else None,
        residual=res,
        se={
            "lr": float(se[0]),
            "p": float(se[1]),
            "momentum": float(se[2]) if u is not None else 0.0,
        },
    )


def differs(x: float, y: float, se_x: float, se_y: float) -> bool:
    """Two fitted coefficients differ beyond their noise (and beyond float32 rounding)."""
    gap = abs(x - y)
    return gap > SIGNIFICANCE * float(np.hypot(se_x, se_y)) and gap > 1e-6 * max(abs(x), abs(y))


@dataclass
class DifferenceFit:
    """``delta_a - delta_b`` explained by a few terms (names: ratio, decay, state)."""

    terms: dict  # name -> coefficient
    residual: float


def fit_difference(
    da: np.ndarray, db: np.ndarray, p: np.ndarray, ub: Optional[np.ndarray]
) -> list[DifferenceFit]:
    """Every smallest set of terms that explains ``da - db``, best first (ties: all of them)."""
    e = da - db
    cands = {"ratio": db, "decay": p}
    if ub is not None:
        cands["state"] = ub
    for size in (1, 2, 3):
        fits = []
        for names in combinations(cands, size):
            got = _lstsq([cands[n] for n in names], e)
            if got is not None and got[1] < EXPLAIN_TOL:
                fits.append(DifferenceFit(dict(zip(names, map(float, got[0]))), got[1]))
        if fits:
            return sorted(fits, key=lambda f: f.residual)
    return []


def fresh_adam(delta: np.ndarray, g: np.ndarray) -> Optional[float]:
    """The learning rate when ``delta ~ -lr * sign(g)`` for (nearly) every element, else None.

    Adam's first step from zero moments is ``-lr * g / (|g| + eps)``: every element moves by
    the same amount. Later steps, with history in the moments, do not.
    """
    live = g != 0
    if live.sum() < MIN_PER_COEF:
        return None
    d, s = delta[live], -np.sign(g[live])
    mag = np.abs(d)
    med = float(np.median(mag))
    if med == 0 or float(np.mean(np.sign(d) == s)) < 0.95:
        return None
    return med if float(np.mean(np.abs(mag - med) <= 0.1 * med)) >= 0.9 else None
