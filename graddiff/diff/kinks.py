"""Tipped kinks: output-gradient elements that rounding switched between zero and non-zero.

A ReLU (ReLU6, Hardtanh, a clamp) passes the gradient where its input is on one side of a
kink and writes an exact zero on the other; a max-pool routes it to the largest element of each
window. Rounding moves an input that sits within rounding of a kink (or of a tie) to the other
side: the backward then differs there by the full size of the gradient, not by a rounding.
Measured on a CNN, float32 vs float16 autocast (docs/tolerance.md, "Tipped kinks"): 2 of 2,304
elements of the first convolution's output gradient tipped, which alone made it differ by rel
0.063 while every other element agreed to 5.6e-4, and its weight gradient by 0.043 (the bound
linear in the unit roundoff allowed 0.047); with a max-pool, 0.093 and 0.128.

The evidence is in the records: an element exactly zero in one run and not in the other, in an
output gradient of a step whose forward pass agrees within precision (the walk judges records
in causal order, so every record before has). Its share of the record,
``phi = ||(a^ - b^) on those elements||`` (each run normalised by its own norm, so a loss scale
changes nothing), is what tipping put there. What it puts into a record the backward computes
from it (``J`` linear, given the forward) is estimated for flips at positions unrelated to
``J``: ``E||J D||^2 = ||D||^2 ||J||_F^2 / N``, a gain ``||J||_F ||d|| / (sqrt(N) ||J d||)`` on
the relative difference. For the gradient of a parameter of the module whose output gradient
``d`` is (``g = sum x d``, ``N = numel(d)``): ``rms(x) ||d|| sqrt(numel(g) / out) / ||g||``,
``x`` the module's input (a 1-D parameter, a bias or a norm's weight: ``x`` of rms 1, gain
``||d|| / ||g||``). Records whose gain is not known (another module's output gradient, a
weight whose input was not recorded) are allowed the share itself.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..reader import Run
from .align import Slot, align
from .pair import RunPair

#: Kinds the backward computes: what a tipped kink reaches.
BACKWARD_KINDS = ("grad_output", "grad", "autograd_grad")


def tipped(
    a: np.ndarray, b: np.ndarray, out_a: Optional[np.ndarray], out_b: Optional[np.ndarray]
) -> np.ndarray:
    """Mask of the elements of two output gradients ``a``/``b`` that a kink tipped: exactly zero
    in one run and not in the other, and explained by the module output ``out_a``/``out_b``
    they are the gradient of (same shape) or by each other:

    - a kink at zero (ReLU: the gradient passes where the output is positive): the element's
      output is positive in one run and not in the other;
    - a re-routed gradient (max-pool: the window's largest element takes it, and rounding
      broke a near-tie): the value that one run has there, the other run has at another
      tipped element, within rounding (``2^-8`` relative, the coarsest precision judged here).

    Other switches (a gradient zeroed by a detach, a mask, a hook) are not tipped kinks."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    switched = (a == 0) != (b == 0)
    if not switched.any():
        return switched
    ok = np.zeros_like(switched)
    if out_a is not None and out_b is not None and np.shape(out_a) == np.shape(out_b):
        oa = np.asarray(out_a, np.float64).ravel()
        ob = np.asarray(out_b, np.float64).ravel()
        ok |= switched & ((oa > 0) != (ob > 0))
    left = switched & ~ok
    only_a, only_b = np.flatnonzero(left & (b == 0)), np.flatnonzero(left & (a == 0))
    if len(only_a) and len(only_b):
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na and nb:  # each run normalised by its own norm: a loss scale changes nothing
            va, vb = a[only_a] / na, b[only_b] / nb
            ok[only_a] = _has_match(va, vb)
            ok[only_b] = _has_match(vb, va)
    return ok


def _has_match(x: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Per element of ``x``: some element of ``pool`` equals it within ``2^-8`` relative."""
    srt = np.sort(pool)
    i = np.clip(np.searchsorted(srt, x), 1, len(srt)) if len(srt) > 1 else np.zeros(len(x), int)
    near = np.minimum(np.abs(srt[i - 1] - x), np.abs(srt[np.minimum(i, len(srt) - 1)] - x))
    return near <= 2.0**-8 * np.abs(x)


def flip_share(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """The share of the difference of ``a``/``b`` on the elements of ``mask``, each tensor
    normalised by its own norm (a loss scale changes nothing)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if not mask.any() or not na or not nb or not (math.isfinite(na) and math.isfinite(nb)):
        return 0.0
    return float(np.linalg.norm(a[mask] / na - b[mask] / nb))


class Kinks:
    """Per step, the output gradients with tipped kinks, and what they allow downstream."""

    def __init__(self, a: Run, b: Run, steps: np.ndarray, chain: dict) -> None:
        self._al = align(a, b, ("input", "activation", "grad_output"))
        self._pair = RunPair(a, b, self._al, steps)
        self._chain = chain  # (kind, name) -> depth in firing order (precision.pair_chain)
        self._steps: dict[int, list[tuple[int, str, float, int]]] = {}

    def close(self) -> None:
        self._pair.close()

    def _flips(self, step: int) -> list[tuple[int, str, float, int]]:
        """[(depth, name, phi, m)] of the output gradients with tipped elements at ``step``."""
        step = int(step)
        if step not in self._steps:
            out = []
            for s in self._al.slots:
                if s.kind != "grad_output":
                    continue
                va, vb = (self._pair.values(side, s, step) for side in ("a", "b"))
                if va is None or vb is None or va.shape != vb.shape:
                    continue
                act = self._pair.slot("activation", s.name)
                oa, ob = (
                    (None, None)
                    if act is None
                    else (self._pair.values(side, act, step) for side in ("a", "b"))
                )
                mask = tipped(va, vb, oa, ob)
                m = int(mask.sum())
                if m:
                    phi = flip_share(va, vb, mask)
                    depth = self._chain.get(("grad_output", s.name), 0)
                    out.append((depth, s.name, phi, m))
            self._steps[step] = out
        return self._steps[step]

    def allowance(self, slot: Slot, step: int, pair: RunPair) -> Optional[dict]:
        """What tipped kinks at ``step`` allow a backward record beyond its rounding bound:
        {"allowed", "share", "gain", "flips", "at"}; None without tipped kinks before it."""
        if slot.kind not in BACKWARD_KINDS:
            return None
        owner = slot.name.rsplit(".", 1)[0] if "." in slot.name else ""
        if slot.kind == "grad_output":
            depth = self._chain.get(("grad_output", slot.name))
        else:
            depth = self._chain.get(("grad_output", owner))
        if depth is None:
            return None
        before = [f for f in self._flips(step) if f[0] <= depth]
        if not before:
            return None
        _, at, share, _ = max(before, key=lambda f: f[2])
        gain = 1.0
        if slot.kind != "grad_output":
            gain = max(1.0, self._gain(slot, owner, step, pair) or 1.0)
        return {
            "allowed": share * gain,
            "share": share,
            "gain": gain,
            "flips": sum(f[3] for f in before),
            "at": f"grad_output {at}",
        }

    def _gain(self, slot: Slot, owner: str, step: int, pair: RunPair) -> Optional[float]:
        """``rms(x) ||d|| sqrt(numel(g) / out) / ||g||`` for the gradient ``g`` of a parameter
        of module ``owner`` (output gradient ``d``, input ``x``), the smaller of the two runs'
        (a loss scale multiplies one run's ``d`` only); None when not known."""
        d_slot = self._pair.slot("grad_output", owner)
        if d_slot is None:
            return None
        gains = []
        for side in ("a", "b"):
            g = pair.values(side, slot, step)
            d = self._pair.values(side, d_slot, step)
            if g is None or d is None or not g.size:
                return None
            ng = float(np.linalg.norm(g.astype(np.float64)))
            nd = float(np.linalg.norm(d.astype(np.float64)))
            if not ng or not math.isfinite(ng) or not math.isfinite(nd):
                return None
            if g.ndim <= 1:
                gains.append(nd / ng)
                continue
            x = self._input_of(owner, side, step, g.shape, d.shape)
            if x is None:
                return None
            rms = float(np.linalg.norm(x.astype(np.float64))) / math.sqrt(x.size)
            gains.append(rms * nd * math.sqrt(g.size / g.shape[0]) / ng)
        return min(gains)

    def _input_of(self, owner: str, side: str, step: int, w: tuple, d: tuple):
        """The input of module ``owner``: the last module output (or model input) recorded
        before the module's own output whose shape fits its weight ``w`` and output ``d``
        (a Linear: last dim ``w[1]``, the same rows; a convolution: channels a multiple of
        ``w[1]``, the same batch); None when none fits."""
        run = self._pair.run(side)
        rows = self._pair.rows(side, step)
        seq = {}
        for e in rows:
            key = run.record_key(int(e["record"]))
            if key.kind in ("input", "activation") and key.call == 0:
                seq[(key.kind, key.name)] = (int(e["seq"]), e)
        own = seq.get(("activation", owner))
        if own is None:
            return None
        best = None
        for (kind, name), (s, e) in seq.items():
            inside = kind == "activation" and (name == owner or name.startswith(owner + "."))
            if s >= own[0] or (inside and owner):
                continue
            shape = tuple(int(v) for v in e["shape"][: int(e["ndim"])])
            if not _fits(shape, w, d):
                continue
            if best is None or s > best[0]:
                best = (s, kind, name)
        if best is None:
            return None
        slot = self._pair.slot(best[1], best[2])
        return None if slot is None else self._pair.values(side, slot, step)


def _fits(x: tuple, w: tuple, d: tuple) -> bool:
    """Can ``x`` be the input of a module with weight shape ``w`` and output shape ``d``?"""
    if not x or not d:
        return False
    if len(w) == 2:  # Linear: (..., in) -> (..., out)
        rows_x = math.prod(x[:-1])
        rows_d = math.prod(d[:-1])
        return x[-1] == w[1] and rows_x == rows_d
    return len(x) == len(w) and x[0] == d[0] and w[1] > 0 and x[1] % w[1] == 0
