"""Step boundaries from ``optimizer.step()``: the global pre-hook sees gradients as the update
uses them (after clipping, unscaling, DDP all-reduce), for every built-in optimizer and
subclasses (FIELD-NOTES 3)."""

from __future__ import annotations

from typing import Any, Callable

import torch.optim.optimizer as _optimizer_module


def optimizer_params(optimizer: Any) -> list[Any]:
    return [p for group in getattr(optimizer, "param_groups", []) for p in group.get("params", [])]


def add_step_pre_hook(on_step: Callable[[Any], None]) -> Any:
    """Call ``on_step(optimizer)`` right before any optimizer's update. Returns the handle."""

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        on_step(optimizer)
        return None  # a non-None return would replace the step's arguments

    return _optimizer_module.register_optimizer_step_pre_hook(hook)
