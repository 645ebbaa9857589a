"""Module hooks: the model's inputs and step starts (root pre-hook), every module's outputs
(forward hooks), and the gradient w.r.t. each output (a tensor hook registered on the output
from the forward hook; ``register_full_backward_hook`` breaks in-place models: FIELD-NOTES 5).

Until the model's own forward first runs with grad, its submodules also carry a
pre-hook and an end hook that find the outermost traced call (a LightningModule's
``training_step`` calling ``self.net(x)``: the root's forward never runs, the submodule's
arguments are the inputs). The recorder removes them at the root's first forward with grad,
so a model called as a whole pays nothing for them after its first step starts.

Each hook is a closure over explicit state, returns None (a forward hook's return value would
replace the module's output) and, under ``torch.compile``, runs outside the compiled graph.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

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
    every: Optional[list[tuple[str, nn.Module]]] = None,
) -> None:
    """Register the root pre/post hooks and one forward hook per selected module; the
    outermost-call hooks go on ``every`` module of the tree (default: the selected ones), so
    the inputs are the model's whatever ``modules=`` selects."""

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

    outer = HandleBag()
    for name, module in every if every is not None else modules:
        if module is root:
            continue
        display = module_display_name(name)

        def outer_pre(mod: nn.Module, args: Any, kwargs: Any, _name: str = display) -> None:
            sink.on_outer_call(_name, args, kwargs)
            return None

        def outer_end(mod: nn.Module, args: Any, output: Any) -> None:
            sink.on_outer_call_end()
            return None

        outer.add(
            module.register_forward_pre_hook(
                _outside_compile(outer_pre, compiled), with_kwargs=True
            )
        )
        end = _outside_compile(outer_end, compiled)
        try:
            outer.add(module.register_forward_hook(end, always_call=True))
        except TypeError:  # torch < 2.2 has no always_call
            outer.add(module.register_forward_hook(end))
    if len(outer):
        bag.add(outer)  # removed with the rest at trace exit (remove() is idempotent)
        sink.outer_hooks = outer
