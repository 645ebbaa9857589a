"""Module hooks: the model's inputs and step starts (root pre-hook), every module's outputs
(forward hooks), and the gradient w.r.t. each output (a tensor hook registered on the output
from the forward hook; ``register_full_backward_hook`` breaks in-place models: FIELD-NOTES 5).

Each hook is a closure over explicit state, returns None (a forward hook's return value would
replace the module's output) and, under ``torch.compile``, runs outside the compiled graph.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .handles import HandleBag
from .naming import module_display_name


def _outside_compile(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if (enabled and disable is not None) else fn


def install_module_hooks(
    root: nn.Module,
    modules: list[tuple[str, nn.Module]],
    sink: Any,
    bag: HandleBag,
    *,
    compiled: bool,
) -> None:
    """Register the root pre/post hooks and one forward hook per selected module."""

    def root_pre(module: nn.Module, args: Any, kwargs: Any) -> None:
        sink.on_model_forward(args, kwargs)
        return None

    def root_post(module: nn.Module, args: Any, output: Any) -> None:
        sink.on_model_forward_end()
        return None

    bag.add(root.register_forward_pre_hook(_outside_compile(root_pre, compiled), with_kwargs=True))
    # always_call: the forward-end bookkeeping runs even when the forward raises.
    post = _outside_compile(root_post, compiled)
    try:
        bag.add(root.register_forward_hook(post, always_call=True))
    except TypeError:  # torch < 2.2 has no always_call
        bag.add(root.register_forward_hook(post))

    for name, module in modules:
        display = module_display_name(name)

        def forward_hook(mod: nn.Module, args: Any, output: Any, _name: str = display) -> None:
            sink.on_module_output(_name, mod, output)
            return None

        bag.add(module.register_forward_hook(_outside_compile(forward_hook, compiled)))
