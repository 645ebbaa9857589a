"""Names: unwrap compiled/DDP wrappers, and flatten structured outputs with stable suffixes."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

ROOT_NAME = "(root)"
#: Name segments of modules that wrappers insert between a module and its children (FSDP1,
#: activation checkpointing): dropped from recorded names so they match the plain model's.
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """``_fsdp_wrapped_module.0.weight`` -> ``0.weight``."""
    if not any(seg in name for seg in WRAPPER_SEGMENTS):
        return name
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)


def wrapped_module(module: nn.Module) -> nn.Module:
    """The module an FSDP1 / checkpoint wrapper holds (the module itself otherwise)."""
    for seg in WRAPPER_SEGMENTS:
        inner = getattr(module, seg, None)
        if isinstance(inner, nn.Module):
            return wrapped_module(inner)
    return module


def is_wrapped_inner(name: str) -> bool:
    """The module a wrapper holds (same output as the wrapper, which keeps the name)."""
    return name.rsplit(".", 1)[-1] in WRAPPER_SEGMENTS


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``torch.compile`` / DDP / DataParallel wrappers.

    Names then match the plain model's (no ``_orig_mod.`` / ``module.`` prefixes).
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        break
    return model


def is_compiled(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def module_display_name(name: str) -> str:
    return name if name else ROOT_NAME


def flatten_tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Tensors inside nested tuples/lists/dicts/dataclasses/namedtuples, with dotted paths.

    A plain tensor gets the path "" (the record is then just the module name).
    """
    out: list[tuple[str, torch.Tensor]] = []
    _flatten(obj, prefix, out, depth=0)
    return out


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _flatten(obj: Any, prefix: str, out: list, depth: int) -> None:
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        out.append((prefix, obj))
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        for field in obj._fields:
            _flatten(getattr(obj, field), _join(prefix, field), out, depth + 1)
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            _flatten(item, _join(prefix, i), out, depth + 1)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _flatten(item, _join(prefix, key), out, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            _flatten(getattr(obj, field.name, None), _join(prefix, field.name), out, depth + 1)


def record_name(module_name: str, path: str) -> str:
    """``fc1.0`` for a plain tensor output, ``lstm:1.0`` for a nested one."""
    base = module_display_name(module_name)
    return f"{base}:{path}" if path else base
