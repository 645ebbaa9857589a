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


def generalize(rules: list[dict[str, Any]], keys_b: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per-layer rules folded into ``{i}`` patterns where that maps B's names identically."""
    if not rules:
        return rules
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rules:
        groups.setdefault(_fold(r), []).append(r)
    folded = []
    for (src, dst, rest), members in groups.items():
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
        folded.append(out)
    if len(folded) == len(rules):
        return rules
    try:
        concrete = NameMap([parse_rule(i + 1, r) for i, r in enumerate(rules)], "concrete")
        general = NameMap([parse_rule(i + 1, r) for i, r in enumerate(folded)], "folded")
        for kind, name in keys_b:
            if concrete.match(kind, name).targets != general.match(kind, name).targets:
                return rules
            if concrete.match(kind, name).part != general.match(kind, name).part:
                return rules
    except MapError:  # a folded pattern overlapping another: keep the concrete rules
        return rules
    return folded
