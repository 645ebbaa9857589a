"""Fold per-layer rules into patterns: ``layers.0.x -> blocks.0.y`` and ``layers.1.x ->
blocks.1.y`` become ``layers.{i}.x -> blocks.{i}.y`` (for ``graddiff map`` and ``--map auto``).

A folded rule is kept only when it maps every record name of B exactly as the rules it
replaces do (checked by applying both maps), so folding never changes what the map means.
"""

from __future__ import annotations

from typing import Any

from .namemap import MapError, NameMap, parse_rule

_VARS = "ijklmn"


def _fold(rule: dict[str, Any]) -> tuple[Any, ...]:
    """The rule with each layer index shared by its B and A names replaced by {i}, {j}, ..."""
    src = rule["from"] if isinstance(rule["from"], list) else [rule["from"]]
    dst = rule["to"] if isinstance(rule["to"], list) else [rule["to"]]
    parts_src = [s.split(".") for s in src]
    parts_dst = [d.split(".") for d in dst]
    numbers = [p for p in parts_src[0] if p.isdigit()]
    used: dict[str, str] = {}
    for num in dict.fromkeys(numbers):
        if len(used) == len(_VARS):
            break
        if all(num in ps for ps in parts_src) and all(num in pd for pd in parts_dst):
            used[num] = "{" + _VARS[len(used)] + "}"

    def sub(parts: list[str]) -> str:
        return ".".join(used.get(p, p) for p in parts)

    key_src = tuple(sub(p) for p in parts_src)
    key_dst = tuple(sub(p) for p in parts_dst)
    rest = tuple(
        (k, tuple(v) if isinstance(v, list) else v)
        for k, v in rule.items()
        if k not in ("from", "to", "confidence", "evidence")
    )
    return key_src, key_dst, rest


def _folded_rule(key: tuple[Any, ...], members: list[dict[str, Any]]) -> dict[str, Any]:
    src, dst, rest = key
    out: dict[str, Any] = {
        "from": src[0] if len(src) == 1 else list(src),
        "to": dst[0] if len(dst) == 1 else list(dst),
    }
    out.update({k: list(v) if isinstance(v, tuple) else v for k, v in rest})
    if "confidence" in members[0]:
        out["confidence"] = min(m["confidence"] for m in members)
    if "evidence" in members[0]:
        whys = list(dict.fromkeys(m["evidence"] for m in members))
        out["evidence"] = whys[0] if len(whys) == 1 else "; ".join(whys[:3])
    return out


def _name_map(rules: list[dict[str, Any]]) -> NameMap:
    return NameMap([parse_rule(i + 1, r) for i, r in enumerate(rules)], "map")


def generalize(rules: list[dict[str, Any]], keys_b: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per-layer rules folded into ``{i}`` patterns, group by group, where that maps B's names
    exactly as before (a layer that differs from its siblings keeps its own rules)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(rules):
        groups.setdefault(_fold(r), []).append(i)
    current: list[dict[str, Any]] = list(rules)
    for key, idx in groups.items():
        if len(idx) < 2:
            continue
        members = [rules[i] for i in idx]
        folded = _folded_rule(key, members)
        ids = {id(m) for m in members}
        trial: list[dict[str, Any]] = []
        for r in current:
            if id(r) in ids:
                if id(r) == id(members[0]):
                    trial.append(folded)
            else:
                trial.append(r)
        try:
            probe = _name_map([folded])
            touched = [k for k in keys_b if probe.match(*k).rule is not None]
            before, after = _name_map(current), _name_map(trial)
            same = all(
                (before.match(*k).targets, before.match(*k).part)
                == (after.match(*k).targets, after.match(*k).part)
                for k in touched
            )
        except MapError:  # the folded pattern overlaps another rule: keep the concrete ones
            same = False
        if same:
            current = trial
    return current
