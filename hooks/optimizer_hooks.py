"""Step boundaries from ``optimizer.step()``: the global pre-hook sees gradients as the update
uses them (after clipping, unscaling, DDP all-reduce), for every built-in optimizer and
subclasses (FIELD-NOTES 3).

``optimizer.step(closure)`` (Lightning's automatic optimization, LBFGS, any user closure) runs
forward and backward *inside* the step, after the pre-hook: there the pre-hook replaces the
closure by a wrapper that reports after every call of it (a pre-hook may return
``(new_args, new_kwargs)``: FIELD-NOTES "Closure optimizers"), and the step ends at the
post-hook. The wrapper returns the closure's own result, untouched.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.optim.optimizer as _optimizer_module

from .handles import HandleBag


def optimizer_params(optimizer: Any) -> list[Any]:
    return [p for group in getattr(optimizer, "param_groups", []) for p in group.get("params", [])]


def _closure_of(args: tuple, kwargs: dict) -> tuple[Any, bool]:
    """The closure passed to ``step`` (``args[0]`` is the optimizer), and whether by keyword."""
    if kwargs and callable(kwargs.get("closure")):
        return kwargs["closure"], True
    if len(args) > 1 and callable(args[1]):
        return args[1], False
    return None, False


def add_step_hooks(sink: Any, bag: HandleBag) -> None:
    """Report optimizer steps to ``sink``.

    Without a closure: ``sink.on_optimizer_step(opt)`` right before the update. With one:
    ``sink.on_closure_step(opt)`` before (a true result asks for the wrapper),
    ``sink.after_closure(opt)`` after each call of the closure, and
    ``sink.on_closure_step_end(opt)`` after the update.
    """

    def pre_hook(optimizer: Any, args: tuple, kwargs: dict) -> Any:
        closure, by_keyword = _closure_of(args, kwargs)
        if closure is None:
            sink.on_optimizer_step(optimizer)
            return None  # a non-None return would replace the step's arguments
        if not sink.on_closure_step(optimizer):
            return None

        @functools.wraps(closure)
        def recorded_closure(*c_args: Any, **c_kwargs: Any) -> Any:
            result = closure(*c_args, **c_kwargs)
            sink.after_closure(optimizer)
            return result

        if by_keyword:
            return args, {**kwargs, "closure": recorded_closure}
        return (args[0], recorded_closure, *args[2:]), kwargs

    def post_hook(optimizer: Any, args: tuple, kwargs: dict) -> None:
        if _closure_of(args, kwargs)[0] is not None:
            sink.on_closure_step_end(optimizer)
        return None

    bag.add(_optimizer_module.register_optimizer_step_pre_hook(pre_hook))
    bag.add(_optimizer_module.register_optimizer_step_post_hook(post_hook))
