"""What float rounding alone produces: unit roundoff per dtype, the rounding-level test.

Used by the cells (the noise floor of the relative difference), the walk and the diagnosis
(is the origin of a divergence rounding-level?).
"""

from __future__ import annotations

import math

#: Unit roundoff per dtype.
EPS = {
    "float64": 2.22e-16,
    "float32": 1.19e-7,
    "float16": 9.77e-4,
    "tfloat32": 9.77e-4,
    "bfloat16": 7.81e-3,
    "complex64": 1.19e-7,
    "complex128": 2.22e-16,
}
#: A tensor-level relative difference up to this many units of roundoff is rounding-level
#: (a few elements 1 ulp apart give far less; a re-associated sum of n terms ~ sqrt(n) eps).
ROUNDING_ULPS = 16


#: Noise floor of a tensor's norm, relative to the largest norm of its kind at that step:
#: below it, values are rounding residue (a Linear's bias gradient before BatchNorm is zero in
#: exact arithmetic and ~1e-9 in float32). min(NOISE_FLOOR_ULPS x eps, NOISE_FLOOR_MAX).
NOISE_FLOOR_ULPS = 1024
NOISE_FLOOR_MAX = 1e-2


def eps_of(dtype: str) -> float:
    """Unit roundoff of a dtype name (0 for integer and bool types: they round nothing)."""
    return EPS.get(dtype, 0.0)


def floor_factor(dtype: str) -> float:
    """The noise floor of ``dtype`` as a fraction of the largest same-kind norm."""
    return min(NOISE_FLOOR_ULPS * eps_of(dtype), NOISE_FLOOR_MAX)


def rounding_level(rel: float, dtype: str) -> bool:
    """True when a relative difference is what float rounding alone produces for ``dtype``."""
    eps = EPS.get(dtype)
    return eps is not None and math.isfinite(rel) and 0 <= rel <= ROUNDING_ULPS * eps
