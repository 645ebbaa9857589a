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
- :func:`fit_fresh`, per run: an update that is ``-lr * sign(g + wd * p) - lr * wd' * p``
  element by element, the first step of an Adam whose moments start at zero; it reads the
  learning rate, a coupled L2 decay ``wd`` (inside the normalisation: it turns directions, never
  sizes) and a decoupled one ``wd'`` (AdamW: outside it).
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


@dataclass
class FreshFit:
    """An update from empty Adam moments: ``delta = -lr * sign(g + coupled * p) - decoupled * p``.

    Adam's first step is ``-lr * g~ / (|g~| + eps)`` with ``g~`` the gradient the moments saw:
    every element moves by ``lr`` (the normalisation), whatever the gradient's size. Coupled L2
    (``Adam(weight_decay=wd)``: ``g~ = g + wd * p``) therefore changes only directions, never
    sizes; decoupled decay (``AdamW``: ``p *= 1 - lr * wd`` first) adds ``-lr * wd * p`` outside
    the normalisation. ``coupled`` is the interval of ``wd`` for which ``-sign(g + wd * p)`` is
    every element's direction (it contains 0 when no direction needs a decay).
    """

    lr: float
    decoupled: float  # lr * wd of a decoupled decay
    se_decoupled: float
    coupled: tuple[float, float]
    #: (wd, standard error, eps) read from the sizes of the elements whose |g~| is near eps,
    #: where they move by visibly less than lr (see :func:`eps_reading`); None: too few
    sized: Optional[tuple[float, float, float]] = None


def fit_fresh(delta: np.ndarray, g: np.ndarray, p: np.ndarray) -> Optional[FreshFit]:
    """Fit one run's update as Adam's first step from empty moments; None when it is not one
    (90% of the moving elements must move by ``lr``, within 1%, after the decoupled term)."""
    live = delta != 0
    n = int(live.sum())
    if n < 2 * MIN_PER_COEF:
        return None
    d, gl, pl = delta[live], g[live], p[live]
    s = np.sign(d)
    cols = [s, pl] if np.any(pl) else [s]
    keep = np.ones(n, dtype=bool)
    for _ in range(2):  # fit, then refit on the elements that are not eps-sized (|g~| ~ eps)
        got = _lstsq([c[keep] for c in cols], d[keep])
        if got is None or got[0][0] <= 0:
            return None
        coef, _, se = got
        pred = coef[0] * s + (coef[1] * pl if len(cols) == 2 else 0.0)
        keep = np.abs(d - pred) <= 1e-2 * coef[0]
        if keep.mean() < 0.9:
            return None
    dec = -float(coef[1]) if len(cols) == 2 else 0.0
    coupled = coupled_range(d, gl, pl, dec)
    if coupled is None:
        return None
    return FreshFit(
        lr=float(coef[0]),
        decoupled=dec,
        se_decoupled=float(se[1]) if len(cols) == 2 else 0.0,
        coupled=coupled,
        sized=eps_reading(d, gl, pl, float(coef[0]), dec),
    )


def coupled_range(
    d: np.ndarray, g: np.ndarray, p: np.ndarray, dec: float
) -> Optional[tuple[float, float]]:
    """The coupled decays ``c`` that Adam's first-step directions allow: each moving element's
    direction is ``-sign(g + c * p) = sign(d + dec * p)``, i.e. ``lhs * c > rhs``; the interval
    (lo, hi) of ``c`` satisfying every element, or None when empty."""
    sig = np.sign(d + dec * p)
    lhs, rhs = -sig * p, sig * g
    if np.any((lhs == 0) & (rhs >= 0)):
        return None
    up, down = lhs > 0, lhs < 0
    lo = float(np.max(rhs[up] / lhs[up])) if up.any() else -np.inf
    hi = float(np.min(rhs[down] / lhs[down])) if down.any() else np.inf
    return (lo, hi) if lo < hi else None


def eps_reading(
    d: np.ndarray, g: np.ndarray, p: np.ndarray, lr: float, dec: float
) -> Optional[tuple[float, float, float]]:
    """A coupled decay too small to turn any direction still shows in the sizes: Adam's first
    step moves an element by ``lr * r`` with ``r = |g~| / (|g~| + eps)``, so an element whose
    ``|g~|`` is within a few thousand eps moves visibly less than ``lr``, and
    ``|g~| = eps * r / (1 - r)``. With ``g~ = g + wd * p`` and the direction known,
    ``g = -wd * p - eps * sign * r / (1 - r)`` is linear in (wd, eps): weighted least squares
    over the elements where ``1 - r`` exceeds 100 float32 ulps of the parameter (relative to
    lr). Returns (wd, its standard error, eps), or None (too few such elements, or the model
    does not hold: eps must come out positive and the residual below 5%)."""
    m = d + dec * p
    r = np.abs(m) / lr
    ulp = 2.0**-23 * (np.abs(p) + np.abs(d)) / lr
    gap = 1.0 - r
    use = (gap > 10 * ulp) & (r > 0)
    if int(use.sum()) < 2 * MIN_PER_COEF:
        return None
    q = r[use] / gap[use]
    sig = np.sign(m[use])
    wt = gap[use] / (q * np.maximum(ulp[use], 1e-30))  # 1 / the error of eps * q, up to eps
    x = np.stack([-p[use], -sig * q], axis=1) * wt[:, None]
    y = g[use] * wt
    if np.linalg.matrix_rank(x) < 2 or float(y @ y) == 0:
        return None
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    res = y - x @ coef
    if coef[1] <= 0 or float(np.sqrt((res @ res) / (y @ y))) > EXPLAIN_TOL:
        return None
    cov = np.linalg.inv(x.T @ x) * float(res @ res) / max(len(y) - 2, 1)
    return float(coef[0]), float(np.sqrt(max(cov[0, 0], 0.0))), float(coef[1])


def fresh_decay(f: FreshFit) -> tuple:
    """The decay a fresh Adam update shows: ("none",), ("coupled",) or ("decoupled", wd)."""
    lo, hi = f.coupled
    if lo > 0 or hi < 0 or sized_decay(f):
        return ("coupled",)
    if abs(f.decoupled) > SIGNIFICANCE * f.se_decoupled and abs(f.decoupled) > 1e-6 * f.lr:
        return ("decoupled", float(f"{f.decoupled / f.lr:.3g}"))
    return ("none",)


def sized_decay(f: FreshFit) -> bool:
    """The sizes prove a coupled decay: significant, and inside what the directions allow."""
    if f.sized is None:
        return False
    wd, se, _ = f.sized
    return abs(wd) > SIGNIFICANCE * se and f.coupled[0] <= wd <= f.coupled[1]
