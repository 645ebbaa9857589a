"""Name the most likely cause of a divergence, with the evidence: the differ's last stage.

Input: the pair of runs and the walk's result (first divergence, first bitwise difference).
Output: a ranked list of :class:`Cause`. Specific rules (rules_forward, rules_backward,
rules_update) run first, then the recorded optimizer settings (rules_settings) add their causes
at an update and say whether they confirm the value fits; a rounding-level origin is listed after them, or alone when none
matched and amplification is plausible; generic descriptions are the fallback.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .compare_records import EQUAL
from .context import UPDATE_AMPLIFICATION, Cause, Context, fmt
from .envdiff import numeric_differences
from .first import WalkResult
from .noise import rounding_level
from .pair import RunPair
from .rules_backward import (
    rule_accumulation,
    rule_loss_scale,
    rule_scaled_grads,
    rule_unscaled_micro_batches,
)
from .rules_clip import rule_clip_by_value, rule_clip_while_scaled
from .rules_config import rule_module_config
from .rules_forward import (
    rule_dropout,
    rule_generic,
    rule_init,
    rule_inputs,
    rule_mode,
    rule_module_output,
    rule_precision,
    rule_structure,
)
from .rules_gradterm import rule_l2_in_gradients
from .rules_graph import rule_extra_grad_path, rule_tied_weights
from .rules_hooks import rule_backward_hook, rule_custom_function
from .rules_lossfn import rule_loss_function, rule_loss_reduction, rule_loss_term
from .rules_micro import rule_accumulation_steps, rule_loss_calls
from .rules_nonfinite import rule_nonfinite
from .rules_noupdate import rule_no_update
from .rules_path import rule_grad_path, rule_zero_vs_none
from .rules_ranks import rule_rank_local_batchnorm
from .rules_settings import apply_settings
from .rules_update import rule_batchnorm, rule_update_rule, rule_update_specific

__all__ = ["Cause", "diagnose"]


def _rounding(x: Context, secondary: bool = False) -> Optional[Cause]:
    """The origin is rounding-level: say so, with the environment differences."""
    o = x.walk.first_bitwise
    if o is None or o.status not in ("values", "stats"):
        return None
    os_ = x.pair.al.slots[o.slot]
    dtype = (o.facts.get("a") or o.facts.get("b") or {}).get("dtype", "")
    if not rounding_level(o.rel, dtype):
        return None
    ev = [
        f"origin: rounding-level difference in {x.label(os_)} at step {o.step} "
        + (
            f"(rel {fmt(o.rel)})"
            if o.basis == "values"
            else f"(rel >= {fmt(o.rel)}, statistics only)"
        )
    ]
    h = x.hit
    same = (h.step, h.slot) == (o.step, o.slot)
    if secondary:
        return Cause(
            "rounding",
            "a rounding-level difference precedes the divergence (not its cause)",
            ev[:1],
            "",
        )
    if not same:
        ev.append(f"amplified to rel {fmt(h.rel)} in {x.label(x.slot)} by step {h.step}")
    if os_.kind == "param" and o.step > int(x.pair.steps[0]):
        prev = x.prev(o.step)
        if x.within(prev, ("grad", "autograd_grad"), 0.0):
            ev.append(
                f"the gradients of step {prev} are bitwise equal: the update rounds differently "
                "(e.g. p -= lr * g vs optimizer.step(), foreach vs single-tensor kernels)"
            )
    env = numeric_differences(x.env_rows)
    if env:
        ev.append("environment: " + "; ".join(f"{r['key']} {r['a']} vs {r['b']}" for r in env[:4]))
    else:
        ev.append("the environments agree (same versions, device, threads, determinism flags)")
    return Cause(
        "rounding",
        "float-rounding-level difference" + ("" if same else ", amplified by training"),
        ev,
        "probably not a bug: the runs compute the same thing in a different order; "
        "confirm with --exact on a shorter run, or make both runs use the same code path",
    )


def _amplification_plausible(x: Context) -> bool:
    """Can rounding noise have grown into this difference? Training amplifies within a step
    (forward and backward), but an update moves parameters by lr x gradient: a parameter cannot
    jump far beyond the previous step's parameter and gradient differences."""
    if x.slot.kind != "param":
        return True
    prev = x.prev(x.step)
    if prev is None:
        return False
    worst = 0.0
    for slot, code in x.slots_of(prev, ("param", "grad", "autograd_grad")):
        if code != EQUAL:
            r = x.rel(slot, prev)
            worst = max(worst, float("inf") if r is None else r)
    return x.hit.rel <= UPDATE_AMPLIFICATION * worst


#: Causes that explain a missing record better than rule_structure's generic ones.
GRAPH_CAUSES = frozenset({"tied_weights", "extra_grad_path", "zero_vs_none_grad"})
#: Causes that explain scaled gradients better than rule_scaled_grads' generic ones.
CLIP_CAUSES = frozenset({"clip_before_unscale", "grad_clipping"})
#: Rules whose readings (a loss ratio, the batch's samples) assume the same samples per step.
BATCH_RULES = (rule_inputs, rule_loss_scale, rule_unscaled_micro_batches, rule_accumulation)
RULES: tuple[Callable[[Context], Any], ...] = (
    rule_nonfinite,
    rule_tied_weights,
    rule_backward_hook,
    rule_custom_function,
    rule_extra_grad_path,
    rule_loss_term,
    rule_grad_path,
    rule_zero_vs_none,
    rule_module_config,
    rule_structure,
    rule_accumulation_steps,
    rule_loss_calls,
    rule_init,
    rule_inputs,
    rule_accumulation,
    rule_clip_while_scaled,
    rule_clip_by_value,
    rule_l2_in_gradients,
    rule_scaled_grads,
    rule_mode,
    rule_dropout,
    rule_rank_local_batchnorm,
    rule_batchnorm,
    rule_no_update,
    rule_update_specific,
    rule_unscaled_micro_batches,
    rule_loss_scale,
    rule_loss_reduction,
    rule_precision,
)
#: A rule is skipped when an earlier rule has named one of these causes (a more specific
#: reading of the same evidence).
SUPPRESSED_BY: dict[Callable[[Context], Any], frozenset] = {
    rule_structure: GRAPH_CAUSES | {"module_config"},  # the settings explain the shapes
    rule_grad_path: GRAPH_CAUSES | {"loss_function"},  # a loss term explains the gradients
    rule_loss_calls: GRAPH_CAUSES,  # a path through another gradient call explains the calls
    rule_scaled_grads: CLIP_CAUSES,
    **{rule: frozenset({"accumulation_steps"}) for rule in BATCH_RULES},
}
#: A cause is dropped when a later rule names one of these: a more specific reading of the
#: same module (its recorded settings then stand in that cause's evidence).
SUPERSEDED_BY: dict[str, frozenset] = {
    "module_config": frozenset({"dropout_rate", "batchnorm_stats", "train_eval_mode"}),
}
#: Generic rules: used only when no specific rule matched and rounding does not explain it.
LATE_RULES: tuple[Callable[[Context], Any], ...] = (
    rule_update_rule,
    rule_loss_function,
    rule_module_output,
    rule_generic,
)


#: Causes about the update (value fits and recorded settings) that an origin below the
#: tolerance can name for a divergence found later in the data flow.
ORIGIN_UPDATE_CAUSES = frozenset(
    {
        "learning_rate",
        "weight_decay",
        "optimizer_state",
        "optimizer_class",
        "optimizer_settings",
    }
)


def _origin_update(pair: RunPair, walk: WalkResult, rtol: float, env_rows: list) -> list[Cause]:
    """The update causes of a divergence that shows first in a later kind of record.

    A small change to the update (a weight decay of 1e-4, a slightly different rate) moves the
    parameters by less than the tolerance, and the first record beyond it is a gradient or an
    activation of the same or a later step, computed from those parameters. The first bitwise
    difference is then a parameter, not at rounding level: the update that made it is the
    origin, and the update rules read it there. Empty when the origin is not such a parameter
    or the update rules name nothing there.
    """
    hit, o = walk.first, walk.first_bitwise
    if hit is None or o is None or o.step > hit.step:
        return []
    so, sh = pair.al.slots[o.slot], pair.al.slots[hit.slot]
    if so.kind != "param" or sh.kind == "param" or o.status not in ("values", "stats"):
        return []
    dtype = (o.facts.get("a") or o.facts.get("b") or {}).get("dtype", "")
    if rounding_level(o.rel, dtype):
        return []
    xo = Context(pair, walk, o, rtol, env_rows)
    causes = apply_settings(xo, list(rule_update_specific(xo)))
    if not causes or causes[0].cause not in ORIGIN_UPDATE_CAUSES:
        return []
    x = Context(pair, walk, hit, rtol, env_rows)
    causes[0].evidence.insert(
        1,
        f"this update's difference is below the tolerance ({xo.label(so)}: {xo.hit_text()} at "
        f"step {o.step}, the first bitwise difference) and grows to {x.hit_text()} in "
        f"{x.label(sh)} at step {hit.step}, computed from these parameters",
    )
    return causes


def diagnose(pair: RunPair, walk: WalkResult, rtol: float, env_rows: list) -> list[Cause]:
    """Ranked causes for the first divergence (or, without one, the first bitwise difference).

    Specific rules come first; a rounding-level origin is listed after them (or alone when none
    matched); generic descriptions are the fallback.
    """
    hit = walk.first or walk.first_bitwise
    if hit is None:
        return []
    origin = _origin_update(pair, walk, rtol, env_rows)
    if origin:
        return origin
    x = Context(pair, walk, hit, rtol, env_rows)
    dtype = (hit.facts.get("a") or hit.facts.get("b") or {}).get("dtype", "")
    tiny = hit.status in ("values", "stats") and rounding_level(hit.rel, dtype)
    # rounding-level: no behavioural cause, except an update rule the series prove (a tiny
    # weight decay is rounding-sized per step, and the fit still sees it)
    rules = (
        (rule_nonfinite, rule_module_config, rule_structure, rule_update_specific)
        if tiny
        else RULES
    )
    causes: list[Cause] = []
    for rule in rules:
        if any(c.cause in SUPPRESSED_BY.get(rule, ()) for c in causes):
            continue
        c = rule(x)
        causes.extend(c if isinstance(c, list) else ([c] if c is not None else []))
    plausible = tiny or _amplification_plausible(x)
    rounding = _rounding(x, secondary=bool(causes) or not plausible)
    if not causes and (rounding is None or not plausible):
        for rule in LATE_RULES:
            c = rule(x)
            if c is not None:
                causes.append(c)
                break
    if rounding is not None:
        causes.append(rounding)
    # the recorded optimizer settings: causes at an update, evidence for or against the fits
    return _superseded(apply_settings(x, causes))


def _superseded(causes: list[Cause]) -> list[Cause]:
    """Drop the causes a more specific one explains (SUPERSEDED_BY)."""
    named = {c.cause for c in causes}
    return [c for c in causes if not SUPERSEDED_BY.get(c.cause, frozenset()) & named]
