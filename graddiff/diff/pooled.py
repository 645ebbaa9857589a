"""Evidence from parameters too small to fit on their own (a bias of 4 elements), by pooling.

A per-parameter fit needs MIN_PER_COEF elements per coefficient (update_fit.py). A small
parameter still says something when it is tested, not fitted: against the coefficients a
larger parameter of the same run gave (same module first), with no free coefficient, or with
only the decay free (the usual no-decay group shares the rate and momentum). A difference
between the runs counts for the small parameter only when its own data *reject* the other run's
value (the swap test in rules_update.py): a decay on a tensor of zeros, or a rate on a gradient
of rounding residue, proves nothing, and is not claimed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .update_fit import (
    FIT_TOL,
    MIN_PER_COEF,
    SIGNIFICANCE,
    FreshFit,
    SgdFit,
    coupled_range,
)

#: Parameters tried as sources for one small parameter.
MAX_SOURCES = 8


def sgd_residual(sr: tuple, lr: float, wd: float, momentum: Optional[float]) -> float:
    """Residual of ``delta = -lr * (g + wd * p) + momentum * u``, relative to the update."""
    d, g, p, u = sr
    pred = -lr * (g + wd * p)
    if momentum and u is not None:
        pred = pred + momentum * u
    dd = float(d @ d)
    r = d - pred
    return float(np.sqrt(float(r @ r) / dd)) if dd > 0 else float("inf")


def predicted(sr: tuple, f: SgdFit) -> bool:
    """The update follows these coefficients (none of them fitted to it)."""
    return sgd_residual(sr, f.lr, f.wd, f.momentum) <= FIT_TOL


def decay_only(sr: tuple, f: SgdFit) -> Optional[SgdFit]:
    """The update fitted with ``f``'s rate and momentum and its own decay (one coefficient)."""
    d, g, p, u = sr
    pp = float(p @ p)
    if d.size < MIN_PER_COEF or pp == 0 or f.lr <= 0:
        return None
    y = d + f.lr * g - ((f.momentum or 0.0) * u if u is not None else 0.0)
    wd = -float(y @ p) / (f.lr * pp)
    r = y + f.lr * wd * p
    se = float(np.sqrt(float(r @ r) / max(d.size - 1, 1) / pp)) / f.lr
    wd = wd if abs(wd) > SIGNIFICANCE * se else 0.0
    g2 = SgdFit(f.lr, wd + 0.0, f.momentum, 0.0, {**f.se, "p": se * f.lr})
    res = sgd_residual(sr, g2.lr, g2.wd, g2.momentum)
    if res > FIT_TOL:
        return None
    g2.residual = res
    return g2


def fresh_given(sr: tuple, lr: float, decoupled: float) -> Optional[tuple[float, float]]:
    """With a larger parameter's rate and decoupled decay: is this update Adam's step from empty
    moments (every moving element moves by ``lr`` within 1%, after ``-decoupled * p``)? Returns
    the coupled-decay interval its directions allow, or None."""
    d, g, p, _ = sr
    live = d != 0
    if not live.any():
        return None
    dl, gl, pl = d[live], g[live], p[live]
    if np.mean(np.abs(np.abs(dl + decoupled * pl) - lr) <= 1e-2 * lr) < 0.9:
        return None
    return coupled_range(dl, gl, pl, decoupled)


def fresh_pooled(sr: tuple, source: FreshFit) -> Optional[FreshFit]:
    """A small parameter's fresh-Adam reading: the source's rate, with its decoupled decay or
    none (a no-decay group), whichever the update follows."""
    for dec in (source.decoupled, 0.0):
        got = fresh_given(sr, source.lr, dec)
        if got is not None:
            return FreshFit(source.lr, dec, source.se_decoupled if dec else 0.0, got)
    return None
