"""``graddiff.compare(a, b)``: open, align, walk, diagnose, and build the Report.

The entry point of the differ (runs --> align --> cells --> walk --> diagnose --> Report). It
turns user input problems into one-line GraddiffErrors and never imports torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from functools import partial
from typing import Any, Optional, Union

import numpy as np

from ..errors import GraddiffError
from ..kinds import ALL_KINDS, parse_kinds
from ..modclass import class_of, class_of_label, describe_list
from ..modclass import merge as merge_classes
from ..ranks.sides import is_several, open_pair, same_run_note
from ..reader import Run, open_run
from .align import align, check_related
from .diagnose import Cause, diagnose
from .envdiff import environment_diff
from .first import Hit, walk
from .kinks import Kinks
from .lossscale import SCALED_KINDS, describe_powers, loss_scale
from .mapped import describe, drop_unpaired, write_mapped
from .matrix import divergence_matrix
from .namemap import load_map
from .noise import floor_factor, rounding_level
from .noiseref import NoiseTolerance, twin_drift, twin_origin
from .pair import RunPair
from .precision import pair_chain, precision_of, slot_rounding, slot_tolerance
from .report import Difference, Report
from .stepalign import offset_note, resolve_offset

#: Default tolerance on the tensor-level relative difference ||a-b|| / max(||a||, ||b||).
#: Rounding noise amplified by one step of a BatchNorm+ReLU MLP reaches 7e-4 in float32 gradients
#: (README.md, "The tolerance, and why 1e-3"); the bugs graddiff looks for give 1e-2 and more within a step.
DEFAULT_RTOL = 1e-3

RunLike = Union[str, "os.PathLike[str]", Run]


def parse_steps(steps: Any) -> Optional[tuple[Optional[int], Optional[int]]]:
    """``None``, an int, ``(lo, hi)``, a ``range``/``slice``, or "K", "LO:HI", "LO:", ":HI" (inclusive)."""
    if steps is None:
        return None
    if isinstance(steps, int):
        return (steps, steps)
    if isinstance(steps, range):
        return (steps.start, steps.stop - 1)
    if isinstance(steps, slice):
        return (steps.start, None if steps.stop is None else steps.stop - 1)
    if isinstance(steps, (tuple, list)) and len(steps) == 2:
        return (steps[0], steps[1])
    text = str(steps).strip()
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            return (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
        return (int(text), int(text))
    except ValueError:
        raise GraddiffError(
            f"--steps {text!r}: use K, LO:HI, LO: or :HI (inclusive step numbers)"
        ) from None


def _open(x: RunLike) -> tuple[Run, bool]:
    if isinstance(x, Run):
        return x, False
    return open_run(x), True


def compare(
    a: RunLike,
    b: RunLike,
    *,
    rtol: Optional[float] = None,
    exact: bool = False,
    steps: Any = None,
    kinds: Any = None,
    name_map: Any = None,
    steps_a: Any = None,
    steps_b: Any = None,
    offset: Optional[int] = None,
    reduction: Optional[str] = None,
    noise: Optional[RunLike] = None,
    noise_of: Optional[str] = None,
) -> Report:
    """Compare two recorded runs and find where they part ways.

    Args:
        a: the first run (path or :class:`graddiff.Run`); "A" in the report. A glob or a list
            of several files is the ranks of one data-parallel run, merged into one trace of
            the global batch first (``graddiff.ranks.merge``, docs/distributed.md).
        b: the second run; "B" (a glob or a list, likewise).
        rtol: tolerance on ||a-b|| / max(||a||, ||b||) per tensor (default 1e-3).
        exact: any bitwise difference is a divergence.
        steps: restrict to these steps ("LO:HI" inclusive, an int, a range).
        kinds: restrict to these kinds (names or a comma-separated string).
        name_map: rules from B's record names to A's (a .yaml/.json path, rules as data, a
            ``NameMap``), or "auto" for the structural match (docs/porting.md).
        steps_a: A's steps to compare ("LO:HI" inclusive, ...); with ``steps_b``, B's first step
            compares with A's first (a run resumed from a checkpoint).
        steps_b: B's steps to compare.
        offset: compare B's step s with A's step s + offset (instead of steps_a/steps_b).
        reduction: the loss reduction of merged ranks, "mean" or "sum" (default: detected
            from the other side's loss, else "mean").
        noise: a perturbed twin of A or B (``graddiff.trace(..., perturb="ulp")``; of the
            lower-precision run, ``perturb="bfloat16"``, for a reduced-precision pair): each
            record's tolerance at each step is 10x how far the twin drifted from its origin
            there (or earlier), instead of ``rtol`` (docs/tolerance.md, "--noise").
        noise_of: "A" or "B": the run the twin is a copy of (default: the run whose recorded
            dtypes the twin shares, else A).

    Returns:
        A :class:`Report`; ``report.exit_code`` is 0 (no divergence) or 1 (diverged).

    Raises:
        GraddiffError: a bad file, bad options, or two runs of unrelated models.
    """
    rtol = DEFAULT_RTOL if rtol is None else float(rtol)
    if not np.isfinite(rtol) or rtol < 0:
        raise GraddiffError(f"--rtol {rtol}: must be a finite number >= 0")
    try:
        kinds_t = parse_kinds(kinds)
    except ValueError as exc:
        raise GraddiffError(f"--kinds: {exc}") from None
    window = parse_steps(steps)
    if noise_of is not None and noise is None:
        raise GraddiffError("--noise-of applies only with --noise")
    if noise is not None and (
        is_several(a)
        or is_several(b)
        or name_map is not None
        or offset is not None
        or steps_a is not None
        or steps_b is not None
    ):
        raise GraddiffError(
            "--noise works on two single runs without --map/--offset/--steps-a/--steps-b"
        )
    if is_several(a) or is_several(b):
        ra, rb, runs, notes, labels = open_pair(a, b, reduction)
        try:
            report = compare(
                ra,
                rb,
                rtol=rtol,
                exact=exact,
                steps=steps,
                kinds=kinds,
                name_map=name_map,
                steps_a=steps_a,
                steps_b=steps_b,
                offset=offset,
            )
        finally:
            for run in runs:
                run.close()
        report.run_a, report.run_b = labels.get("A", report.run_a), labels.get("B", report.run_b)
        report.notes[:0] = notes
        return report
    if reduction is not None:
        raise GraddiffError("--reduction applies only when a side is several rank files")
    ra, own_a = _open(a)
    try:
        rb, own_b = _open(b)
    except BaseException:
        if own_a:
            ra.close()
        raise
    try:
        if name_map is None and offset is None and steps_a is None and steps_b is None:
            drift, origin = (
                _drift(ra, rb, noise, kinds_t, noise_of, rtol)
                if noise is not None
                else (None, None)
            )
            report = _compare(
                ra, rb, rtol, exact, window, kinds_t, filtered=kinds is not None, drift=drift
            )
            report = _up_to_loss_scale(
                report, ra, rb, rtol, exact, window, kinds_t, kinds, drift=drift
            )
            if noise is not None:
                report.noise = str(noise.path if isinstance(noise, Run) else noise)
                report.noise_of = origin[0]
                report.notes.append(
                    f"--noise: the tolerance is 10x the twin's drift from {origin[0]} "
                    f"(the twin is {origin[0]}'s: {origin[1]})"
                )
            first = report.first
            if first is not None and first.kind == "param" and first.step == report.steps["first"]:
                note = offset_note(ra, rb)  # a run resumed from a checkpoint of A?
                if note:
                    report.notes.append(note)
            note = same_run_note(ra, rb)  # two ranks of one run: `graddiff ranks` is the check
            if note:
                report.notes.insert(0, note)
            return report
        return _compare_mapped(
            ra,
            rb,
            rtol,
            exact,
            window,
            kinds_t,
            name_map,
            steps_a,
            steps_b,
            offset,
            filtered=kinds is not None,
        )
    finally:
        if own_a:
            ra.close()
        if own_b:
            rb.close()


def _up_to_loss_scale(
    report: Report, ra, rb, rtol, exact, window, kinds_t, kinds, drift=None
) -> Report:
    """A run that scales its loss by 2^n (a GradScaler) diverges at the loss and output
    gradients only by that exact factor (lossscale.py). When so, judge them up to it and every
    other kind as usual: the report of the other kinds, with the scale in its scope. With a
    twin's ``drift`` (--noise), the other kinds are judged by the twin as the first report
    was; the factor itself by the precision tolerance, as without a twin."""
    first = report.first
    if first is None or first.kind not in SCALED_KINDS:
        return report
    steps = np.intersect1d(ra.steps, rb.steps)
    if window is not None:
        steps = steps_within(steps, window)
    within = _scale_tolerance(ra, rb, kinds_t, rtol, exact)
    found = loss_scale(ra, rb, steps, within)
    partial = found is None and len(steps) > 1
    if partial:  # the scale at the first step only: a bug may change the later losses
        found = loss_scale(ra, rb, steps[:1], within)
    if found is None:
        return report
    others = tuple(k for k in kinds_t if k not in SCALED_KINDS)
    if not others:
        return report
    try:
        rest = _compare(
            ra, rb, rtol, exact, window, others, filtered=kinds is not None, drift=drift
        )
    except GraddiffError:
        return report
    first_step = int(steps[0])
    if rest.diverged and (rest.first is None or rest.first.step <= first_step):
        return report  # the factor reaches the gradients: a loss weight, not a GradScaler
    if partial and not rest.diverged:
        return report  # later losses are no such multiples, yet nothing else differs
    run, powers = found
    scale = describe_powers(powers)
    n_go = sum(1 for k in ra.keys if k.kind == "grad_output")
    low = precision_of(ra, rb).dtype if within is not None else None
    rest.loss_scale = {"run": run, "log2": sorted(set(powers.values()))}
    if low:
        rest.loss_scale["within"] = low
    rest.kinds = list(kinds_t)
    if rest.diverged:  # a GradScaler (step 0's gradients agree unscaled) and a bug elsewhere
        rest.loss_scale = None
        where = f"at step {first_step}" if partial else f"at each of the {len(steps)} steps"
        rest.notes.insert(
            0,
            f"{run} scales its loss by {scale} (a GradScaler): {where} its loss and "
            f"output-gradient norms are {scale} x the other run's"
            + (f" within {low} precision" if low else "")
            + f", and the gradients of step {first_step} agree unscaled; loss and grad_output "
            "are left out of this comparison (compare --kinds loss,grad_output to see them)",
        )
        return rest
    rest.compared_kinds = [k for k in ALL_KINDS if k in rest.compared_kinds or k in SCALED_KINDS]
    rest.diagnosis.insert(
        0,
        Cause(
            "loss_scaling",
            f"{run} scales its loss by {scale} (a GradScaler) and unscales its gradients before "
            "the update: the same training",
            [
                f"every loss of {run} is "
                + (
                    f"{scale} x the other run's within {low} precision"
                    if low
                    else f"exactly {scale} x the other run's"
                )
                + f" at each of the {len(steps)} compared steps",
                f"the norms of the {n_go} output gradient record(s) are scaled by the same "
                "factor at every step" + (f" (within {low} precision)" if low else ""),
                "everything else compared agrees as the headline says, gradients included: "
                "they are unscaled before the optimizer uses them",
            ],
            "nothing to fix; compare with --kinds excluding loss,grad_output to leave the "
            "scaled quantities out",
        ),
    )
    return rest


def _scale_tolerance(ra: Run, rb: Run, kinds_t, rtol: float, exact: bool):
    """For a reduced-precision pair (not --exact): (step, kind, name, call) -> the record's
    precision tolerance at that step, as the walk judges it; None otherwise (exact multiples)."""
    prec = precision_of(ra, rb)
    if exact or not prec.reduced:
        return None
    al = align(ra, rb, kinds_t)
    common = np.intersect1d(ra.steps, rb.steps)
    pair = RunPair(ra, rb, al, common)
    chain = pair_chain(ra, rb, int(common[0])) if len(common) else None
    pair.tol = slot_tolerance(al, rtol, prec, chain)
    pair.rounding = slot_rounding(al, prec, chain)
    pair.first_step = int(ra.steps[0]) if len(ra.steps) else pair.first_step
    pair.close()

    def tol(key: tuple) -> float:
        step, kind, name, call = key
        slot = pair.slot(kind, name, call)
        return float(rtol) if slot is None else pair.tolerance(slot.index, step)

    return tol


def _compare_mapped(
    ra, rb, rtol, exact, window, kinds, name_map, steps_a, steps_b, offset, filtered=False
):
    """Rename/transform/shift B into a temporary trace (mapped.py), then compare as usual."""
    win_a, win_b = parse_steps(steps_a), parse_steps(steps_b)
    if offset is not None and not isinstance(offset, int):
        try:
            offset = int(str(offset))
        except ValueError:
            raise GraddiffError(
                f"--offset {offset!r}: must be an integer number of steps"
            ) from None
    shift = resolve_offset(ra, rb, win_a, win_b, offset)
    if shift < 0:  # B ahead of A: its first -shift steps have no step of A to meet
        lo_b = win_b[0] if win_b is not None and win_b[0] is not None else 0
        win_b = (max(lo_b, -shift), win_b[1] if win_b is not None else None)
    notes = []
    nm = None
    if isinstance(name_map, str) and name_map == "auto":
        from .automap import propose_map

        proposal = propose_map(ra, rb)
        if proposal.rules():
            nm = proposal.name_map
            notes.extend(proposal.notes())
        else:
            notes.append("--map auto: the two runs already share their record names")
    elif name_map is not None:
        nm = load_map(name_map)
    if win_a is not None:
        window = _intersect(window, win_a)
    tmpdir = tempfile.mkdtemp(prefix="graddiff-map-")
    try:
        res = write_mapped(ra, rb, nm, os.path.join(tmpdir, "b-mapped.h5"), shift, win_b)
        if not res.steps_written:
            raise GraddiffError(f"{rb.path}: no step of B left to compare after --steps-b/--offset")
        with open_run(res.path) as rb2:
            report = _compare(
                ra,
                rb2,
                rtol,
                exact,
                window,
                kinds,
                mapped=nm is not None,
                filtered=filtered,
                # shifted or windowed runs cover different steps by design
                restricted=bool(shift) or win_a is not None or win_b is not None,
                # steps the map could not carry over still exist in B (in A's numbering)
                b_steps=_shifted(rb.steps, win_b, shift),
            )
            first = report.first
            at_start = first is not None and first.step == report.steps["first"]
            if not shift and at_start and first.kind == "param":
                note = offset_note(ra, rb2)  # B's names are A's here
                if note:
                    report.notes.append(note)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    weakref.finalize(report, shutil.rmtree, tmpdir, True)
    report.run_b = rb.path
    if nm is not None:
        notes.insert(0, describe(res, nm))
    if shift:
        notes.append(f"B's step s is compared with A's step s{shift:+d} (step offset {shift})")
    notes.extend(res.notes)
    report.notes[:0] = notes
    report.structure["name_map"] = {
        "map": nm.origin if nm is not None else None,
        "rules": len(nm) if nm is not None else 0,
        "renamed": res.renamed,
        "transformed": res.transformed,
        "unmapped_b": res.unmapped_b,
        # B's own names: their classes come from B's original trace, not the renamed copy
        "unmapped_b_classes": [class_of_label(rb.module_classes, x) for x in res.unmapped_b],
        "step_offset": shift,
    }
    return report


def _shifted(steps: np.ndarray, window, shift: int) -> np.ndarray:
    """B's steps inside ``--steps-b``, in A's numbering."""
    if window is not None:
        lo, hi = window
        steps = steps[(steps >= (lo if lo is not None else steps.min(initial=0)))]
        steps = steps[(steps <= (hi if hi is not None else steps.max(initial=0)))]
    return steps + shift


def _intersect(window, other):
    if window is None:
        return other
    lo = max((x for x in (window[0], other[0]) if x is not None), default=None)
    hi = min((x for x in (window[1], other[1]) if x is not None), default=None)
    return (lo, hi)


def _compare(
    ra: Run,
    rb: Run,
    rtol: float,
    exact: bool,
    window,
    kinds: tuple[str, ...],
    mapped: bool = False,
    filtered: bool = False,
    restricted: bool = False,
    b_steps: Optional[np.ndarray] = None,
    drift: Optional[dict] = None,
) -> Report:
    notes = []
    for run, tag in ((ra, "A"), (rb, "B")):
        if not len(run.steps):
            raise GraddiffError(f"{run.path}: no complete step recorded; nothing to compare")
        if not run.complete:
            notes.append(
                f"{tag} ({run.path}): recording status '{run.status}'; its {len(run.steps)} complete steps are compared"
            )
        if run.values_note:
            notes.append(f"{tag}: {run.values_note}")
    check_related(ra, rb)
    al = align(ra, rb, kinds)
    if mapped:  # records without a counterpart are listed (structure), not compared
        al = drop_unpaired(al)
        if al.only_a or al.only_b:
            notes.append(
                f"with a name map, records without a counterpart are listed, not compared: "
                f"{len(al.only_a)} of A, {len(al.only_b)} of B (see structure)"
            )
    if not al.slots:
        raise GraddiffError(
            f"nothing to compare: neither {ra.path} nor {rb.path} recorded {', '.join(kinds)}"
        )
    common = np.intersect1d(ra.steps, rb.steps)
    if window is not None:
        lo, hi = window
        common = common[
            (common >= (lo if lo is not None else common.min(initial=0)))
            & (common <= (hi if hi is not None else common.max(initial=0)))
        ]
    if not len(common):
        raise GraddiffError(
            f"{ra.path} and {rb.path} have no step in common" + (" in --steps" if window else "")
        )
    pair = RunPair(ra, rb, al, common)
    prec = precision_of(ra, rb)
    pair.precision = prec
    chain = pair_chain(ra, rb, int(common[0])) if prec.reduced else None
    pair.tol = slot_tolerance(al, rtol, prec, chain)
    pair.rounding = slot_rounding(al, prec, chain)  # grows with the steps since A's first
    pair.first_step = int(ra.steps[0]) if len(ra.steps) else pair.first_step
    if drift is not None:
        pair.noise = NoiseTolerance(al, drift, _dtype_lookup(ra, rb))
    if prec.reduced:  # rounding residue is judged at the computing precision's noise floor
        pair.dtypes.floor = np.maximum(pair.dtypes.floor, floor_factor(prec.dtype))
        if drift is None and not exact:
            pair.kinks = Kinks(ra, rb, common, chain)
    classes = merge_classes(ra.module_classes, rb.module_classes)
    try:
        w = walk(pair, rtol, exact)
        env = environment_diff(ra.environment, rb.environment)
        causes = diagnose(pair, w, rtol, env)
        first, first_bitwise = (
            _difference(pair, w.first, classes),
            _difference(pair, w.first_bitwise, classes),
        )
        for d, h in ((first, w.first), (first_bitwise, w.first_bitwise)):
            if d is not None:
                d.tolerance = pair.tolerance(h.slot, h.step)
    finally:
        pair.close()
        if pair.kinks is not None:
            pair.kinks.close()
    steps_b = rb.steps if b_steps is None else b_steps
    only_a = np.setdiff1d(ra.steps, steps_b)
    only_b = np.setdiff1d(steps_b, ra.steps)
    if window is not None:  # --steps restricts the comparison: steps outside it do not count
        only_a, only_b = steps_within(only_a, window), steps_within(only_b, window)
    mismatch = None if restricted else _step_mismatch(ra.steps, steps_b, only_a, only_b)
    if mismatch is not None:
        causes.insert(0 if w.first is None else len(causes), mismatch)
    structure = {
        "only_in_a": al.only_a,
        "only_in_b": al.only_b,
        "pairing": [n for n in al.notes],
        "shape_changes": _changes(w, al, "shape"),
        "dtype_changes": _changes(w, al, "dtype"),
        "not_comparable": [
            {"label": al.slots[slot].label, "steps": n, "how": al.slots[slot].note}
            for slot, n in sorted(w.unjudged.items())
        ],
        "zero_vs_none": [
            {"label": al.slots[slot].label, "steps": n} for slot, n in sorted(w.zero_none.items())
        ],
        "extra_outputs": [
            {"label": al.slots[slot].label, "steps": n, "in": _side_of(al.slots[slot])}
            for slot, n in sorted(w.extra_outputs.items())
        ],
        "stateless_modules": [
            {"label": al.slots[slot].label, "steps": n, "in": _side_of(al.slots[slot])}
            for slot, n in sorted(w.stateless_one_sided.items())
        ],
        "steps_only_in_a": _span(only_a),
        "steps_only_in_b": _span(only_b),
    }
    if w.kinks is not None:
        notes.append(_kinks_note(w.kinks, al, prec.dtype))
    if w.residue is not None and w.residue.get("bias"):
        r = w.residue
        notes.append(
            f"rounding-dominated bias elements: {al.slots[r['slot']].label} differs by rel "
            f"{r['rel']:.2g} at step {r['step']}, beyond the rounding bound {r['tolerance']:.2g}, "
            f"and by {r['rel_rest']:.2g} once the shift its bias {r['bias']} adds is taken out "
            f"for the {r['elements']} of its {r['size']} elements whose gradient the runs did "
            "not agree on even in size or sign at an earlier step (rounding residue, which Adam "
            "scales to full-sized updates of either sign)"
        )
    elif w.residue is not None and "carried_from" in w.residue:
        r = w.residue
        notes.append(
            f"{al.slots[r['slot']].label} differs by rel {r['rel']:.2g} at step {r['step']}, "
            f"beyond the rounding bound {r['tolerance']:.2g}, but is bitwise the buffer at "
            f"the end of step {r['carried_from']} in both runs, judged there"
        )
    elif w.residue is not None and w.residue.get("input"):
        r = w.residue
        notes.append(
            f"{al.slots[r['slot']].label} differs by rel {r['rel']:.2g} at step {r['step']}, "
            f"beyond the rounding bound {r['tolerance']:.2g}, as the running average "
            f"(momentum {r['momentum']:g}) of its input {r['input']}, which is within: "
            f"apart from that it differs by {r['rel_rest']:.2g}"
        )
    elif w.residue is not None:
        r = w.residue
        notes.append(
            f"rounding-dominated gradient elements: {al.slots[r['slot']].label} differs by rel "
            f"{r['rel']:.2g} at step {r['step']}, beyond the rounding bound {r['tolerance']:.2g}: "
            f"{r['share']:.2g} of it in {r['elements']} of its {r['size']} elements whose "
            "gradient the runs did not agree on even in size or sign at an earlier step "
            "(rounding residue, which Adam scales to full-sized updates of either sign); the "
            f"other elements differ by {r['rel_rest']:.2g}"
        )
    if w.zero_none:
        n = len(w.zero_none)
        notes.append(
            f"{n} gradient record{'s are' if n != 1 else ' is'} None in one run and all zeros in "
            "the other at some steps (zero_grad(set_to_none=...) differs, or an unused "
            "parameter): compared as equal, a None gradient being zero (see structure)"
        )
    if w.extra_outputs:
        n = len(w.extra_outputs)
        notes.append(
            f"{n} module output record{'s are' if n != 1 else ' is'} recorded in one run only, "
            "while the same modules' other outputs are in both (one implementation returns an "
            "extra value, such as attention weights, that the other returns as None): not "
            "compared: what it feeds is recorded and compared (see structure)"
        )
    if w.stateless_one_sided:
        mods = sorted({al.slots[s].name.split(":", 1)[0] for s in w.stateless_one_sided})
        shown = describe_list([(m, classes.get(m)) for m in mods], 4)
        notes.append(
            f"{len(mods)} module{'s' if len(mods) != 1 else ''} without parameters or buffers "
            f"({shown}) record{'s' if len(mods) == 1 else ''} outputs in one run only: an op "
            "written as a module in one run and as a function (F.relu) in the other, or "
            "called a different number of times; not compared, since what they feed is "
            "recorded and compared (see structure)"
        )
    report = Report(
        run_a=ra.path,
        run_b=rb.path,
        rtol=rtol,
        exact=exact,
        steps={
            "compared": int(len(common)),
            "first": int(common[0]),
            "last": int(common[-1]),
            "in_a": int(len(ra.steps)),
            "in_b": int(len(steps_b)),
            "differing": int(w.steps_differing),
        },
        first=first,
        first_bitwise=first_bitwise,
        diagnosis=causes,
        environment_diff=env,
        structure=structure,
        growth=w.growth,
        kinds=list(al.kinds),
        compared_kinds=[k for k in ALL_KINDS if any(s.kind == k for s in al.slots)],
        kinds_filtered=filtered,
        steps_mismatch=mismatch is not None,
        precision={
            "dtype": prec.dtype,
            "unit_roundoff": prec.u,
            "a": prec.a,
            "b": prec.b,
            "reduced": prec.reduced,
        },
        notes=notes,
        max_rel_diff=w.max_rel,
        module_classes=classes,
    )
    report._matrix = partial(divergence_matrix, ra.path, rb.path, al.kinds, common)
    return report


def _kinks_note(k: dict, al, dtype: str) -> str:
    """The note on the first record that tipped kinks explain."""
    label = al.slots[k["slot"]].label
    via = f" x gain {k['gain']:.2g} (kinks.py)" if k["gain"] > 1 else ""
    return (
        f"tipped kinks: at step {k['step']}, {k['flips']} output-gradient element(s) are zero "
        f"in one run and not in the other ({k['at']}: a ReLU or max-pool input within "
        f"{dtype} rounding of its kink); {label} differs by rel {k['rel']:.2g}, beyond the "
        f"rounding bound {k['tolerance']:.2g} but within it plus their share "
        f"{k['share']:.2g}{via}"
    )


def _drift(
    ra: Run, rb: Run, noise: RunLike, kinds: tuple[str, ...], noise_of, rtol: float
) -> tuple:
    """The twin's drift from its origin, and (origin "A"/"B", why)."""
    twin, own = _open(noise)
    try:
        tag, why = twin_origin(ra, rb, twin, noise_of)
        return twin_drift(ra if tag == "A" else rb, twin, kinds, rtol), (tag, why)
    finally:
        if own:
            twin.close()


def _dtype_lookup(ra: Run, rb: Run):
    """slot -> the recorded dtype of its first record (A's, else B's)."""
    da = {ra.record_key(r): ra.record_dtype(r) for r in range(ra.n_records)}
    db = {rb.record_key(r): rb.record_dtype(r) for r in range(rb.n_records)}

    def dtype_of(slot) -> str:
        if slot.keys_a:
            return da.get(slot.keys_a[0], "float32")
        return db.get(slot.keys_b[0], "float32") if slot.keys_b else "float32"

    return dtype_of


def steps_within(steps: np.ndarray, window) -> np.ndarray:
    """The steps inside a parsed ``(lo, hi)`` window (either bound may be None)."""
    lo, hi = window
    keep = np.ones(len(steps), bool)
    if lo is not None:
        keep &= steps >= lo
    if hi is not None:
        keep &= steps <= hi
    return steps[keep]


def _steps_text(steps: np.ndarray) -> str:
    n = len(steps)
    if not n:
        return "none"
    contiguous = int(steps[-1]) - int(steps[0]) + 1 == n
    span = f"{int(steps[0])}..{int(steps[-1])}" if n > 1 else f"{int(steps[0])}"
    return f"{n} step{'s' if n > 1 else ''} ({span}{'' if contiguous else ', with gaps'})"


def _side_of(slot) -> str:
    """ "A" or "B": the run that records a one-sided slot."""
    return "A" if slot.keys_a else "B"


def _step_mismatch(
    sa: np.ndarray, sb: np.ndarray, only_a: np.ndarray, only_b: np.ndarray
) -> Optional[Cause]:
    """Steps recorded in one run only: a truncated or longer run is a difference, not a pass."""
    if not len(only_a) and not len(only_b):
        return None
    ev = [f"A records {_steps_text(sa)}, B records {_steps_text(sb)}"]
    for tag, only in (("A", only_a), ("B", only_b)):
        if len(only):
            ev.append(f"in {tag} only (not compared): {_steps_text(only)}")
    shorter = [t for t, o in (("B", only_a), ("A", only_b)) if len(o)]
    title = (
        f"the runs record different steps: {shorter[0]} is missing {len(only_a) or len(only_b)} "
        "step(s) of the other run"
        if len(shorter) == 1
        else "the runs record different steps (each has steps the other lacks)"
    )
    return Cause(
        "step_mismatch",
        title,
        ev,
        "compare only the common steps with --steps LO:HI, or re-record the shorter run to the "
        "same length (a crashed or truncated run also shows here)",
    )


def _span(steps: np.ndarray) -> Optional[list[int]]:
    return [int(steps[0]), int(steps[-1]), int(len(steps))] if len(steps) else None


def _changes(w, al, what: str) -> list[dict[str, Any]]:
    out = []
    for (kind, slot), (step, facts) in sorted(w.changes.items(), key=lambda kv: kv[1][0]):
        if kind != what:
            continue
        fa, fb = facts.get("a") or {}, facts.get("b") or {}
        key = "shape" if what == "shape" else "dtype"
        out.append(
            {"label": al.slots[slot].label, "step": step, "a": fa.get(key), "b": fb.get(key)}
        )
    return out


def _difference(pair: RunPair, hit: Optional[Hit], classes: dict[str, str]) -> Optional[Difference]:
    if hit is None:
        return None
    slot = pair.al.slots[hit.slot]
    fa, fb = hit.facts.get("a"), hit.facts.get("b")
    dtype = (fa or fb or {}).get("dtype", "")
    rel = None if hit.basis == "structure" else float(hit.rel)
    d = Difference(
        step=hit.step,
        kind=slot.kind,
        name=slot.name,
        call=max(slot.call, 0),
        label=slot.label,
        status=hit.status,
        basis=hit.basis,
        rel_diff=rel,
        a=fa,
        b=fb,
        rounding_level=rel is not None
        and hit.status in ("values", "stats")
        and rounding_level(rel, dtype),
        module_class=class_of(classes, slot.kind, slot.name),
        update=hit.facts.get("update"),
    )
    vd = hit.value_diff
    if vd is not None and not vd.bitwise_equal:
        d.max_abs_diff, d.index, d.fraction_differing = (
            vd.max_abs_diff,
            vd.index,
            vd.fraction_differing,
        )
        d.a_value, d.b_value = vd.a_value, vd.b_value
    if hit.basis == "stats":
        d.note = (
            f"judged on statistics only (rel_diff is a lower bound); re-record with "
            f"graddiff.trace(..., full_steps=[{hit.step}]) for element detail"
        )
    if slot.note:
        d.note = (d.note + "; " if d.note else "") + slot.note
    return d
