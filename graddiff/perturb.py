"""``graddiff.trace(..., perturb=...)``: record a twin whose initial parameters are nudged.

The twin is the reference pair two traces alone do not give: run the same training twice,
the second time with ``perturb="ulp"``; how far the twin drifts from the first run, record by
record and step by step, is what rounding-sized perturbations grow into in this training
(``graddiff compare A B --noise twin.h5``, diff/noiseref.py).

The nudge: every floating-point parameter element moves by one unit in the last place, of the
parameter's own dtype (``perturb="ulp"``) or of a lower precision the run computes in
(``perturb="bfloat16"`` / ``"float16"``, for autocast runs, whose float32 parameters are
rounded to that precision before use). Up or down per element, by a fixed hash of the element's
position (about half each way), like rounding errors, whose signs do not follow the values: a
nudge all one way is largely a rescaling, which normalisation layers remove, so the twin would
not drift as rounding makes runs drift (docs/tolerance.md). It is applied in place, under
``torch.no_grad``, once at trace entry; no random numbers are drawn and nothing else changes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import TraceUsageError

#: Mantissa bits (stored, without the implicit one) of the precisions a nudge may use.
_MANTISSA = {"float64": 52, "float32": 23, "bfloat16": 7, "float16": 10}
PERTURB_MODES = ("ulp", "bfloat16", "float16")


def check_perturb(perturb: Optional[str]) -> Optional[str]:
    if perturb is None or perturb in PERTURB_MODES:
        return perturb
    raise TraceUsageError(
        f"perturb={perturb!r}: choose one of {', '.join(PERTURB_MODES)} (or None)"
    )


def nudge_signs(p: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per element of ``p``, from a fixed multiplicative hash of its flat position
    (Fibonacci hashing): deterministic on every device, about half each way, no RNG."""
    idx = torch.arange(p.numel(), dtype=torch.int64, device=p.device).reshape(p.shape)
    return (((idx * 0x9E3779B1) >> 16) & 1) * 2 - 1


def nudge_parameters(model: nn.Module, perturb: str) -> int:
    """Move every float parameter element by one ulp, up or down (``nudge_signs``); returns
    how many elements moved."""
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            own = str(p.dtype).replace("torch.", "")
            bits = _MANTISSA.get(own if perturb == "ulp" else perturb)
            if bits is None or (perturb != "ulp" and _MANTISSA.get(own, 0) < bits):
                continue
            up = nudge_signs(p) > 0
            if perturb == "ulp":
                inf = torch.full_like(p, float("inf"))
                p.copy_(torch.nextafter(p, torch.where(up, inf, -inf)))
            else:
                # ulp of the lower precision at |p|: 2^(exponent - 1 - mantissa bits)
                _, e = torch.frexp(p)
                step = torch.ldexp(torch.ones_like(p), e - 1 - bits)
                step = torch.where(up, step, -step)
                p.add_(torch.where(p == 0, torch.zeros_like(p), step))
            n += p.numel()
    return n
