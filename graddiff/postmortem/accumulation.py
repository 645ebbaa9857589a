"""Detect ``.grad`` accumulating across steps: a missing ``optimizer.zero_grad()``.

Evidence, strongest first; the first kind that can decide, decides:

1. reference: a fresh gradient of the same step is recorded: ``autograd_grad`` of the parameter,
   or, for a bias ``X.bias``, ``grad_output`` of module ``X`` summed over all but the channel
   axis. Normal: grad(k) = a*fresh(k). Accumulating: grad(k) = grad(k-1) + a*fresh(k). With stored
   values this is a least-squares fit per step; with statistics only, the same fit on sums
   (mean * numel) across steps with one common scale ``a`` (a loss scale or a mean over a batch).
2. values (no reference): accumulation keeps the previous gradient whole, so the projection
   coefficient of grad(k) on grad(k-1) is about 1 or more while the norm grows; in normal training
   it is the batch-to-batch correlation times the norm ratio, and the norm does not keep growing.
3. norms (statistics only): most gradient norms grow steadily (3x or more, rank correlation
   with the step >= 0.4) while the loss stays flat; a normal run whose gradients explode raises its
   loss too.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..reader import RecordKey, Run
from .findings import MAX_NAMES, Finding
from .series import Series, loss_curve

ACC, NORMAL = "acc", "normal"
FIT_TOL = 0.05  # relative residual of a fit that explains the gradient
MISFIT = 0.2  # relative residual of a fit that does not
MAX_PAIRS = 512  # consecutive step pairs per parameter: accumulation shows from the first ones

Vote = tuple[Series, str, int, dict]  # (grad series, ACC/NORMAL, first step, evidence)


def find_grad_accumulation(
    run: Run, series: dict[RecordKey, Series], *, max_value_steps: int = 32
) -> list[Finding]:
    """At most one ``grad_accumulation`` finding: the first accumulating step and parameter."""
    grads = [s for k, s in series.items() if k.kind == "grad"]
    if not grads:
        return []
    _, loss = loss_curve(run, series)
    for method, votes in (
        ("reference", lambda: _by_reference(run, series, grads, max_value_steps)),
        ("values", lambda: _by_values(run, grads, max_value_steps)),
        ("norms", lambda: _by_norms(grads, strict=not len(loss))),
    ):
        cast = votes()
        if cast:
            return _verdict(method, cast, loss)
    return []


def _verdict(method: str, votes: list[Vote], loss: np.ndarray) -> list[Finding]:
    acc = [v for v in votes if v[1] == ACC]
    need = 0.5 if method == "reference" else 0.7
    if not acc or len(acc) < need * len(votes):
        return []
    evidence = {"method": method, "checked": len(votes), "accumulating": len(acc)}
    if method != "reference":
        growth = _loss_growth(loss)
        if growth is not None and growth > 2.0:
            return []  # the loss blew up too: an exploding run, not an accumulating one
        evidence["loss_growth"] = growth
    acc.sort(key=lambda v: v[2])
    first, _, step, ev = acc[0]
    evidence.update(ev)
    evidence["names"] = [v[0].key.name for v in acc][:MAX_NAMES]
    if method == "reference":
        how = (
            f"grad at step {step} equals the previous step's grad plus this step's fresh gradient "
            f"(residual {ev['residual_accumulating']:.2g}; as a fresh gradient alone "
            f"{ev['residual_fresh']:.2g})"
        )
    elif method == "values":
        how = (
            f"grad keeps the previous step's gradient whole (projection coefficient "
            f"{ev['retained']:.3g}) while its norm grew {ev['growth']:.3g}x"
        )
    else:
        loss_txt = (
            ""
            if evidence["loss_growth"] is None
            else f" while the loss stayed within {evidence['loss_growth']:.2g}x"
        )
        how = (
            f"gradient norms grew steadily ({ev['growth']:.3g}x, rank correlation with the step "
            f"{ev['rank_corr']:.2f}){loss_txt}"
        )
    message = (
        f"{how}; {len(acc)} of {len(votes)} parameters checked look the same: .grad accumulates "
        f"across steps (call optimizer.zero_grad() every step)"
    )
    return [Finding("grad_accumulation", step, "grad", first.key.name, message, evidence)]


def _loss_growth(loss: np.ndarray) -> Optional[float]:
    a = np.abs(loss[np.isfinite(loss)])
    if len(a) < 2:
        return None
    q = max(1, len(a) // 4)
    head = float(np.median(a[:q]))
    return float(np.median(a[-q:])) / head if head > 0 else None


# -- 1. against a fresh reference -------------------------------------------------------------
def _references(series: dict[RecordKey, Series], name: str) -> tuple[list[Series], str]:
    refs = [s for k, s in series.items() if k.kind == "autograd_grad" and k.name == name]
    if refs:
        return refs, "same"
    if name == "bias" or name.endswith(".bias"):
        module = name[: -len(".bias")] if name != "bias" else "(root)"
        return [
            s for k, s in series.items() if k.kind == "grad_output" and k.name == module
        ], "bias"
    return [], ""


def _fit(g: np.ndarray, prev: np.ndarray, fresh: np.ndarray) -> Optional[tuple[str, dict]]:
    """Is g a scaled fresh gradient, or prev plus one? None when the data cannot tell."""
    g, prev, fresh = (np.asarray(x, np.float64).ravel() for x in (g, prev, fresh))
    gn, fn, pn = (float(np.linalg.norm(x)) for x in (g, fresh, prev))
    if not (np.isfinite([gn, fn, pn]).all() and gn > 0 and fn > 0 and pn > 0):
        return None
    if abs(float(fresh @ prev)) > 0.99 * fn * pn:
        return None  # collinear: both stories fit
    r_fresh = float(np.linalg.norm(g - (g @ fresh) / fn**2 * fresh)) / gn
    design = np.stack([fresh, prev], axis=1)
    coef = np.linalg.lstsq(design, g, rcond=None)[0]
    r_acc = float(np.linalg.norm(g - design @ coef)) / gn
    ev = {"residual_fresh": r_fresh, "residual_accumulating": r_acc, "retained": float(coef[1])}
    if r_fresh < FIT_TOL:
        return NORMAL, ev
    if r_acc < FIT_TOL and r_fresh > MISFIT and coef[1] > 0.5:
        return ACC, ev
    return None


def _fresh_candidates(ref_values: list[np.ndarray], size: int, how: str) -> list[np.ndarray]:
    """The fresh gradient a reference implies (several guesses of the channel axis for a bias)."""
    if how == "same":
        return [sum(v.astype(np.float64) for v in ref_values)]
    first = ref_values[0]
    if any(v.ndim != first.ndim for v in ref_values):
        return []
    axes = [ax for ax in range(first.ndim) if first.shape[ax] == size] if first.ndim else []
    out = []
    for ax in sorted(axes, key=lambda a: a != first.ndim - 1):  # the last axis first (Linear)
        total = 0.0
        for v in ref_values:
            other = tuple(i for i in range(v.ndim) if i != ax)
            total = total + v.astype(np.float64).sum(axis=other)
        out.append(np.asarray(total))
    return out


def _sum_of(row: np.void) -> float:
    return float(row["mean"]) * float(row["numel"])


def _by_reference(run: Run, series, grads: list[Series], max_value_steps: int) -> list[Vote]:
    votes: list[Vote] = []
    for g in grads:
        refs, how = _references(series, g.key.name)
        if not refs:
            continue
        vec: list[tuple[int, str, dict]] = []
        sums = []  # (step, G_k, G_k-1, S_k, |G_k| / max possible)
        for i in range(1, len(g.rows)):
            if len(sums) >= MAX_PAIRS:
                break
            prev, cur = g.rows[i - 1], g.rows[i]
            step = int(cur["step"])
            if int(prev["step"]) != step - 1 or any(r["nan"] or r["inf"] for r in (prev, cur)):
                continue
            ref_rows = [r.row_at(step) for r in refs]
            if any(r is None or r["nan"] or r["inf"] for r in ref_rows):
                continue
            total = _sum_of(cur)
            scale = float(cur["norm"]) * np.sqrt(max(int(cur["numel"]), 1))
            sums.append(
                (
                    step,
                    total,
                    _sum_of(prev),
                    sum(_sum_of(r) for r in ref_rows),
                    abs(total) / scale if scale else 0.0,
                )
            )
            stored = all(_has_values(r) for r in [prev, cur, *ref_rows])
            if stored and len(vec) < max_value_steps:
                gk, gp = run.values_of(cur), run.values_of(prev)
                cands = _fresh_candidates([run.values_of(r) for r in ref_rows], gk.size, how)
                fits = [f for f in (_fit(gk, gp, c) for c in cands if c.size == gk.size) if f]
                fits.sort(key=lambda f: f[0] != NORMAL)
                if fits:
                    vec.append((step, *fits[0]))
        if vec:
            n_acc = sum(1 for v in vec if v[1] == ACC)
            verdict = ACC if n_acc > len(vec) / 2 else NORMAL
            first = next((v for v in vec if v[1] == verdict), vec[0])
            votes.append((g, verdict, first[0], dict(first[2], pairs=len(vec))))
            continue
        scalar = _scalar_fit(sums)
        if scalar is not None:
            votes.append((g, scalar[0], sums[0][0], scalar[1]))
    return votes


def _has_values(row: np.void) -> bool:
    from ..format import FLAG_VALUES

    return bool(row["flags"] & FLAG_VALUES)


def _scalar_fit(sums: list[tuple]) -> Optional[tuple[str, dict]]:
    """The two stories on per-step sums, one common scale over all steps."""
    if len(sums) < 3:
        return None
    arr = np.array([s[1:] for s in sums], dtype=np.float64)
    cur, prev, fresh, share = arr.T
    if not np.isfinite(arr).all() or np.median(share) < 1e-3 or not np.any(fresh):
        return None  # the sums cancel out (softmax logits' bias): they carry no signal
    norm = float(np.linalg.norm(cur))
    r_fresh = float(np.linalg.norm(cur - (cur @ fresh) / (fresh @ fresh) * fresh)) / norm
    delta = cur - prev
    r_acc = float(np.linalg.norm(delta - (delta @ fresh) / (fresh @ fresh) * fresh)) / norm
    ev = {"residual_fresh": r_fresh, "residual_accumulating": r_acc, "pairs": len(sums)}
    if r_fresh < FIT_TOL / 2:
        return NORMAL, ev
    if r_acc < FIT_TOL / 2 and r_fresh > MISFIT:
        return ACC, ev
    return None


# -- 2. stored values of consecutive gradients --------------------------------------------------
def _by_values(run: Run, grads: list[Series], max_value_steps: int) -> list[Vote]:
    votes: list[Vote] = []
    for g in grads:
        rows = g.rows
        pairs = [
            i
            for i in range(1, len(rows))
            if int(rows["step"][i - 1]) == int(rows["step"][i]) - 1
            and _has_values(rows[i - 1])
            and _has_values(rows[i])
        ][:max_value_steps]
        if len(pairs) < 2:
            continue
        betas = []
        for i in pairs:
            cur = run.values_of(rows[i]).astype(np.float64).ravel()
            prev = run.values_of(rows[i - 1]).astype(np.float64).ravel()
            pp = float(prev @ prev)
            if pp > 0 and np.isfinite(pp) and np.isfinite(cur).all():
                betas.append(float(cur @ prev) / pp)
        if len(betas) < 2:
            continue
        norms = rows["norm"][[pairs[0] - 1, *pairs]]
        growth = float(norms[-1] / norms[0]) if norms[0] > 0 else 0.0
        retained = float(np.median(betas))
        verdict = ACC if retained >= 0.9 and growth >= 1.5 else NORMAL
        votes.append(
            (
                g,
                verdict,
                int(rows["step"][pairs[0]]),
                {"retained": retained, "growth": growth, "pairs": len(betas)},
            )
        )
    return votes


# -- 3. norms only ------------------------------------------------------------------------------
def _rank_corr(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if np.std(rx) == 0 or np.std(ry) == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def _by_norms(grads: list[Series], strict: bool) -> list[Vote]:
    votes: list[Vote] = []
    # growth is the signal; the rank correlation only asks that it be a trend, not one spike
    min_corr, min_growth = (0.7, 5.0) if strict else (0.4, 3.0)
    for g in grads:
        ok = np.isfinite(g.norm)
        norms, steps = g.norm[ok], g.steps[ok]
        if len(norms) < 4 or norms[0] <= 0:
            continue
        q = max(1, len(norms) // 4)
        growth = float(np.median(norms[-q:]) / norms[0])
        corr = _rank_corr(steps, norms)
        verdict = ACC if corr >= min_corr and growth >= min_growth else NORMAL
        votes.append(
            (g, verdict, int(steps[1]), {"growth": growth, "rank_corr": corr, "steps": len(norms)})
        )
    return votes
