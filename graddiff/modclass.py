"""Module classes of record names: ``fc1.1`` -> ``BatchNorm1d``, shown as ``fc1.1 (BatchNorm1d)``.

The tracer writes the map module name -> class name once per run (root attribute
``module_classes``, see graddiff/format.py); every output that names a record (terminal report,
JSON, HTML, plots, ``show``/``check``) looks the class up here. Pure and torch-free: the reading
side uses it. Traces written before the map existed simply show no class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Optional

#: How the root module is named in records (hooks/naming.py ROOT_NAME).
ROOT = "(root)"
_MODULE_KINDS = frozenset({"activation", "grad_output"})  # named after the module (+ ":path")
_NO_MODULE = frozenset({"input", "loss"})  # the model's inputs, the loss: no owning module
# every other kind (param, grad, autograd_grad, buffer, buffer_start, ...) is "<module>.<tensor>"


def owner(kind: str, name: str) -> Optional[str]:
    """The module a record belongs to, or None (inputs, loss, autograd inputs)."""
    if kind in _MODULE_KINDS:
        return name.split(":", 1)[0]
    if kind in _NO_MODULE or name.startswith("input["):  # input[i]: autograd.grad w.r.t. an input
        return None
    return name.rsplit(".", 1)[0] if "." in name else ROOT


def class_of(classes: Mapping[str, str], kind: str, name: str) -> Optional[str]:
    """The class name of the module owning ``kind name``; None when unknown."""
    mod = owner(kind, name)
    return classes.get(mod) if mod is not None else None


def with_class(text: str, cls: Optional[str]) -> str:
    """``text (cls)``, or ``text`` when the class is unknown."""
    return f"{text} ({cls})" if cls else text


def describe(classes: Mapping[str, str], kind: str, name: str, text: Optional[str] = None) -> str:
    """``text`` (default: the name) followed by the owning module's class."""
    return with_class(name if text is None else text, class_of(classes, kind, name))


def class_of_label(classes: Mapping[str, str], label: str) -> Optional[str]:
    """The class of a differ label ``"kind name"`` / ``"kind name #call"``; None when unknown."""
    kind, _, rest = label.partition(" ")
    return class_of(classes, kind, rest.partition(" ")[0])


def describe_label(classes: Mapping[str, str], label: str) -> str:
    """A differ label ``"kind name"``, ``"kind name #call"`` or ``"kind name (2 calls)"`` with
    the class after the name (record names hold no spaces)."""
    kind, _, rest = label.partition(" ")
    name, sep, tail = rest.partition(" ")
    return with_class(f"{kind} {name}", class_of(classes, kind, name)) + (f" {tail}" if sep else "")


def describe_list(items: Sequence[tuple[str, Optional[str]]], limit: Optional[int] = None) -> str:
    """Names with their classes, compactly: neighbours that share a class carry it once.

    ``[("0.weight", "Linear"), ("2.weight", "Linear"), ("1.weight", "LayerNorm")]`` ->
    ``"0.weight, 2.weight (both Linear), 1.weight (LayerNorm)"``; three or more neighbours
    read ``(all Linear)``; a name whose class is unknown stands alone; beyond ``limit`` names,
    ``" and 3 more"``. Every list of record names in graddiff's sentences is written this way.
    """
    shown = list(items if limit is None else items[:limit])
    groups: list[tuple[list[str], Optional[str]]] = []
    for name, cls in shown:
        if groups and cls and groups[-1][1] == cls:
            groups[-1][0].append(name)
        else:
            groups.append(([name], cls))
    parts = []
    for names, cls in groups:
        text = ", ".join(names)
        if cls:
            many = "" if len(names) == 1 else ("both " if len(names) == 2 else "all ")
            text += f" ({many}{cls})"
        parts.append(text)
    more = len(items) - len(shown)
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def parse(raw: Any) -> dict[str, str]:
    """The stored JSON map, tolerant of absence and damage (old traces: empty)."""
    if raw is None:
        return {}
    try:
        data = json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}


def merge(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, str]:
    """One map for two runs: ``Linear`` when they agree, ``Linear / LoRALinear`` when not."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif out[k] != v:
            out[k] = f"{out[k]} / {v}"
    return out
