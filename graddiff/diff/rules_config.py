"""Diagnosis rule: a module of the same class built with other settings.

Each trace records every module's settings as torch prints them (``extra_repr``: a
LayerNorm's ``eps``, a GELU's ``approximate``, a Linear's ``bias``, a Dropout's ``p``). Where
the first difference (beyond the tolerance, or the first bitwise one) belongs to a module whose
recorded settings differ between the runs, those settings are the evidence: the same class
computing with other arguments, a typical porting bug (``layer_norm_eps=1e-12`` vs torch's
``1e-5``, GELU's tanh approximation vs the exact one).
"""

from __future__ import annotations

from typing import Optional

from ..modclass import owner
from .context import Cause, Context

#: Settings pairs shown in a title; the evidence lists them all.
TITLE_SETTINGS = 2


def split_settings(text: str) -> list[str]:
    """``"(4,), eps=1e-05, elementwise_affine=True"`` -> its top-level comma-separated items
    (commas inside brackets or quotes do not split)."""
    items, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        items.append("".join(cur).strip())
    return items


def settings_diff(a: str, b: str) -> list[tuple[str, str, str]]:
    """The items where two settings strings differ: ``(key, in A, in B)``.

    Items ``key=value`` are matched by key, the others by position; a key present in one
    string only reads ``(absent)`` on the other side.
    """

    def keyed(text: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for i, item in enumerate(split_settings(text)):
            key, eq, value = item.partition("=")
            out[key.strip() if eq else f"#{i}"] = value.strip() if eq else item
        return out

    ka, kb = keyed(a), keyed(b)
    keys = list(ka) + [k for k in kb if k not in ka]
    return [
        (k, ka.get(k, "(absent)"), kb.get(k, "(absent)")) for k in keys if ka.get(k) != kb.get(k)
    ]


def differing_settings(x: Context, module: str) -> list[tuple[str, str, str]]:
    """The recorded settings of ``module`` that differ between the runs (empty when equal,
    not recorded in either run, or the classes differ: that is a module swap)."""
    sa = getattr(x.pair.a, "module_settings", {}) or {}
    sb = getattr(x.pair.b, "module_settings", {}) or {}
    if module not in sa or module not in sb:
        return []
    ca = (getattr(x.pair.a, "module_classes", {}) or {}).get(module)
    cb = (getattr(x.pair.b, "module_classes", {}) or {}).get(module)
    if ca != cb:
        return []
    return settings_diff(sa[module], sb[module])


def settings_text(items: list[tuple[str, str, str]], limit: Optional[int] = None) -> str:
    """``eps=1e-05 in A, 1e-12 in B; approximate='none' in A, 'tanh' in B``."""
    shown = items if limit is None else items[:limit]
    parts = [
        f"{k}: {va} in A, {vb} in B" if k.startswith("#") else f"{k}={va} in A, {vb} in B"
        for k, va, vb in shown
    ]
    more = len(items) - len(shown)
    return "; ".join(parts) + (f" and {more} more" if more > 0 else "")


def settings_evidence(x: Context, module: str) -> Optional[str]:
    """One evidence line for another rule about this module (dropout, BatchNorm), or None."""
    items = differing_settings(x, module)
    if not items:
        return None
    return f"recorded settings of {x.module(module)} differ: {settings_text(items)}"


def rule_module_config(x: Context) -> Optional[Cause]:
    """The first difference (or the first bitwise difference before it) belongs to a module of
    the same class whose recorded settings differ."""
    hits = [x.hit] + [h for h in (x.walk.first_bitwise,) if h is not None and h is not x.hit]
    for h in hits:
        slot = x.pair.al.slots[h.slot]
        module = owner(slot.kind, slot.name)
        if module is None:
            continue
        items = differing_settings(x, module)
        if not items:
            continue
        where = (
            f"the first difference, {x.label(slot)} at step {h.step} ({x.hit_text()}), belongs "
            f"to {x.module(module)}"
            if h is x.hit
            else f"the first bitwise difference, {x.label(slot)} at step {h.step}, belongs to "
            f"{x.module(module)}; the first divergence ({x.label(x.slot)} at step {x.step}, "
            f"{x.hit_text()}) comes after it"
        )
        return Cause(
            "module_config",
            f"module {x.module(module)} is built with other settings: "
            f"{settings_text(items, TITLE_SETTINGS)}",
            [
                where,
                f"its recorded settings (torch's extra_repr) differ: {settings_text(items)}",
                "the module class is the same in both runs",
            ],
            "build the module with the same arguments in both runs (a config value such as "
            "layer_norm_eps, an activation's approximate=, bias=, or a default that differs "
            "between the two code bases)",
        )
    return None
