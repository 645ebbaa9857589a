"""Precision-aware tolerance: the precision two runs compute in, and what its rounding allows.

Input: the two runs' recorded dtypes and the alignment; output: a tolerance per slot, used by
the walk (first.py) instead of the flat ``rtol`` when a run computes in bfloat16 or float16.

The computing precision of a run is the lowest precision among the dtypes of its parameters and
module outputs (an autocast region records bfloat16/float16 activations; ``model.half()``
records float16 parameters; float32 with a reduced matmul/convolution precision allowed
counts as that precision: TF32 on CUDA, oneDNN's bf16/tf32 on CPU, from the recorded
environment's legacy flags and ``fp32_precision`` settings). The tolerance of a record grows with its depth ``d`` in the step's
causal chain (the number of module outputs and output gradients computed before it that
compute, chain_depths: a container, Identity, Flatten or inactive Dropout rounds nothing):
``tol = max(rtol, 8 x u x (1 + d) x sqrt(1 + n))``, ``u`` the unit roundoff of the lower
computing precision and ``n`` the optimizer steps since the first recorded step: each update
adds its own rounding to parameters that carry the earlier steps' rounding, and independent
errors accumulate like a random walk (docs/tolerance.md, "Precision-aware tolerance", for the
choice and its measurements). Runs that both compute in float32 or float64 keep ``rtol``:
``8 x u x (1 + d)`` is far below it.

A parameter is also judged by the size of its update (``update_difference``): the update an
optimizer step adds, ``p[n] - p[n-1]``, is computed from the gradient of step ``n - 1``, so its
norm may differ by that gradient's tolerance, plus the rounding of storing the new parameter,
and no more. The parameter itself carries its initial value and every earlier update, so its
own relative difference hides an update that is twice as large (twice the learning rate under
SGD moves a parameter by ~1e-3 of its norm, far below the bound of a deep record). The size,
not the elements: an Adam update normalises each element, so rounding that flips the sign of a
near-zero gradient element flips a full-sized update element (measured: rel 1.0 on a
convolution's bias between a bfloat16 and a float32 run, whose update norms agree to 1e-4).

Backward records beyond this bound at a step where rounding tipped a ReLU or max-pool are
judged with the share of the tipped elements as well (kinks.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..reader import Run
from .align import Alignment

#: Unit roundoff (half the machine epsilon) of the floating-point formats.
UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "bfloat16": 2.0**-8,
    "float16": 2.0**-11,
    "tfloat32": 2.0**-11,  # TF32 matmuls/convolutions on CUDA (10 mantissa bits)
    "complex64": 2.0**-24,
    "complex128": 2.0**-53,
}
#: Rounding errors per unit of depth, in units of roundoff: the largest ratio
#: rel / (u x (1 + depth)) measured between bfloat16-autocast and float32 runs of the same
#: training (MLP, BatchNorm MLP, transformer layer; SGD and AdamW) was 3.1 over 6 steps and
#: 4.8 over 20 (docs/tolerance.md); 8 leaves a margin of 1.7x over the latter.
ULPS_PER_DEPTH = 8.0
#: Kinds whose dtypes say in which precision the run computes.
_PRECISION_KINDS = ("param", "activation")


@dataclass
class Precision:
    """The precision a pair of runs is judged in."""

    dtype: str  # the lower of the two runs' computing precisions
    u: float  # its unit roundoff
    a: str  # run A's computing precision
    b: str  # run B's

    @property
    def reduced(self) -> bool:
        """Lower than float32: the tolerance follows the precision."""
        return self.u > UNIT_ROUNDOFF["float32"]


def computing_dtype(run: Run) -> Optional[str]:
    """The lowest-precision float dtype among a run's parameters and module outputs."""
    best, worst = None, 0.0
    for r in range(run.n_records):
        if run.record_key(r).kind not in _PRECISION_KINDS:
            continue
        name = run.record_dtype(r)
        u = UNIT_ROUNDOFF.get(name, 0.0)
        if u > worst:
            best, worst = name, u
    return best


def fp32_setting(env: dict, backend: str, op: str) -> Optional[str]:
    """The effective ``fp32_precision`` of one backend's op in a recorded environment
    (environment.py): the op's own setting, else (``"none"``) its backend's, else the
    generic default; None when not recorded (torch < 2.9, or older traces)."""
    for key in (f"fp32_precision_{backend}_{op}", f"fp32_precision_{backend}", "fp32_precision"):
        value = env.get(key)
        if value not in (None, "none"):
            return str(value)
    return None


def _tf32(run: Run, dtype: str) -> str:
    """The precision float32 matmuls and convolutions are allowed to compute in: TF32 on CUDA
    (legacy ``allow_tf32`` flags, ``fp32_precision="tf32"`` of cuBLAS or cuDNN, or
    ``set_float32_matmul_precision("high"/"medium")``); on CPU, oneDNN's
    ``fp32_precision="bf16"``/``"tf32"``. Allowed, not proven: a backend may keep float32
    (measured on an avx512_bf16 CPU without AMX: oneDNN's "bf16" kept float32 accuracy)."""
    if dtype != "float32":
        return dtype
    env = run.environment or {}
    device = str(env.get("device", ""))
    if device.startswith("cuda"):
        tf32 = (
            env.get("tf32_matmul")
            or env.get("tf32_cudnn")
            or env.get("float32_matmul_precision") in ("high", "medium")
            or "tf32" in (fp32_setting(env, "cuda", "matmul"), fp32_setting(env, "cudnn", "conv"))
        )
        return "tfloat32" if tf32 else dtype
    if device.startswith("cpu"):
        cpu = {fp32_setting(env, "mkldnn", op) for op in ("matmul", "conv")}
        if "bf16" in cpu:
            return "bfloat16"
        if "tf32" in cpu:
            return "tfloat32"
    return dtype


def precision_of(a: Run, b: Run) -> Precision:
    da = _tf32(a, computing_dtype(a) or "float32")
    db = _tf32(b, computing_dtype(b) or "float32")
    low = max((da, db), key=lambda d: UNIT_ROUNDOFF.get(d, 0.0))
    return Precision(low, UNIT_ROUNDOFF.get(low, UNIT_ROUNDOFF["float32"]), da, db)


def chain_depths(run: Run, step: int) -> dict[tuple[str, str], int]:
    """(kind, name) -> the number of computing module outputs and output gradients up to and
    including this record at ``step``, in firing order.

    Only records that compute count: a record bitwise equal to the previous record of its kind
    (same fingerprint, size and dtype) rounds nothing. That leaves out what only passes a
    tensor on: a container whose output is its last child's (``nn.Sequential``, the model
    itself), ``nn.Identity``, ``nn.Flatten`` (a view), a Dropout in eval mode or with p = 0,
    and their output gradients. Every kind counts, whatever ``--kinds`` compares.
    """
    rows = run.entries(int(step), int(step))
    rows = rows[np.argsort(rows["seq"], kind="stable")]
    out: dict[tuple[str, str], int] = {}
    prev: dict[str, tuple] = {}
    n = 0
    for e in rows:
        rid = int(e["record"])
        key = run.record_key(rid)
        if key.kind not in ("activation", "grad_output"):
            continue
        sig = (int(e["fp_sum"]), int(e["fp_pos"]), int(e["numel"]), run.record_dtype(rid))
        if sig[:2] == (0, 0) or prev.get(key.kind) != sig:  # no fingerprint: counted
            n += 1
        prev[key.kind] = sig
        out.setdefault((key.kind, key.name), n)
    return out


def slot_depths(al: Alignment, chain: Optional[dict[tuple[str, str], int]] = None) -> np.ndarray:
    """Per slot, the number of computing module outputs and output gradients before it.

    ``chain``: the depths of the runs' module outputs and output gradients
    (``pair_chain``); without it, every activation and output-gradient slot of the alignment
    counts, in slot order. Slots are in causal order (params, inputs, activations in call
    order, losses, output gradients in firing order, gradients, buffers). A parameter's
    gradient (and the parameter, which the update moves by it) sits just after its module's
    output gradient; a buffer at its module's output; a loss after the last module output.
    """
    depth = np.zeros(len(al.slots), np.int64)
    if chain is None:
        chain, n = {}, 0
        for s in al.slots:
            if s.kind in ("activation", "grad_output"):
                n += 1
                chain.setdefault((s.kind, s.name), n)
    act = {name: d for (kind, name), d in chain.items() if kind == "activation"}
    gout = {name: d for (kind, name), d in chain.items() if kind == "grad_output"}
    deepest = max(chain.values(), default=0)
    last_act = max(act.values(), default=0)
    for s in al.slots:
        owner = s.name.rsplit(".", 1)[0] if "." in s.name else ""
        if s.kind in ("activation", "grad_output"):
            d = chain.get((s.kind, s.name), deepest if s.kind == "grad_output" else last_act)
        elif s.kind in ("grad", "autograd_grad", "param"):
            d = gout[owner] + 1 if owner in gout else deepest
        elif s.kind in ("buffer", "buffer_start"):
            d = act.get(owner, deepest if s.kind == "buffer" else 0)
        elif s.kind == "loss":
            d = last_act
        else:  # inputs
            d = 0
        depth[s.index] = d
    return depth


def pair_chain(a: Run, b: Run, step: int) -> dict[tuple[str, str], int]:
    """The depths of both runs' records at ``step`` (chain_depths), the larger of the two
    where they differ: a record that passes a tensor on in one run only still computes."""
    out = chain_depths(a, step)
    for key, d in chain_depths(b, step).items():
        out[key] = max(out.get(key, 0), d)
    return out


def slot_tolerance(
    al: Alignment, rtol: float, p: Precision, chain: Optional[dict] = None
) -> np.ndarray:
    """Per slot, the relative difference rounding in precision ``p`` may produce in one step
    (>= rtol): the tolerance at the first recorded step."""
    rounding = slot_rounding(al, p, chain)
    tol = np.full(len(al.slots), float(rtol))
    return tol if rounding is None else np.maximum(tol, rounding)


def slot_rounding(
    al: Alignment, p: Precision, chain: Optional[dict] = None
) -> Optional[np.ndarray]:
    """Per slot, ``8 x u x (1 + depth)`` for a reduced precision; None otherwise."""
    return ULPS_PER_DEPTH * p.u * (1.0 + slot_depths(al, chain)) if p.reduced else None


def update_difference(
    a_prev: np.ndarray,
    a: np.ndarray,
    b_prev: np.ndarray,
    b: np.ndarray,
    tol: float,
    u_a: float,
    u_b: float,
) -> Optional[tuple[float, float]]:
    """(rel, allowed): how much the sizes of the updates ``a - a_prev`` and ``b - b_prev`` of
    one parameter differ, ``| ||da|| - ||db|| | / max(||da||, ||db||)``, and what rounding
    allows for it: ``tol`` (the tolerance of the gradient the update was computed from) plus
    the rounding of storing the new parameter in each run's dtype (``u x ||p||``, unit
    roundoff ``u_a``/``u_b``: a bfloat16 parameter's update is quantised to its ulps). A
    learning rate ``f`` times larger gives rel ``1 - 1/f``. None when neither run moved it."""
    na = float(np.linalg.norm(a.astype(np.float64) - a_prev.astype(np.float64)))
    nb = float(np.linalg.norm(b.astype(np.float64) - b_prev.astype(np.float64)))
    scale = max(na, nb)
    if not scale or not math.isfinite(scale):
        return None
    stored = u_a * float(np.linalg.norm(a.astype(np.float64))) + u_b * float(
        np.linalg.norm(b.astype(np.float64))
    )
    return abs(na - nb) / scale, tol + stored / scale


def steps_factor(step: int, first_step: int) -> float:
    """How one step's rounding compounds over the ``n`` optimizer steps since the first
    recorded one: ``sqrt(1 + n)``, the growth of a sum of independent errors."""
    return math.sqrt(1.0 + max(0, int(step) - int(first_step)))
