"""See every gradient computation: ``backward()`` and ``torch.autograd.grad`` alike.

torch routes both through one module global, ``torch.autograd._engine_run_backward`` (torch
>= 2.3), looked up at call time; wrapping it sees ``loss.backward()``,
``torch.autograd.backward`` and ``grad(...)`` even when user code did
``from torch.autograd import grad`` before the trace (patching ``torch.autograd.grad`` would miss
that: FIELD-NOTES 4). Older torch falls back to wrapping the public functions.

One process-wide wrapper dispatches to the active listeners, so several traces (of different
models) can be active at once and can exit in any order.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import torch
import torch.autograd as _autograd

_lock = threading.Lock()
_listeners: list[Any] = []
_restore: list[Callable[[], None]] = []
_current_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def inside_backward() -> bool:
    """True while the autograd engine runs (checkpoint recompute, nested backward)."""
    try:
        return _current_task_id() != -1
    except Exception:
        return False


_is_compiling: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_compiling", lambda: False
)


def _dispatch(
    call: Callable[..., Any], outputs: Any, accumulate: bool, inputs: Any, *a: Any, **kw: Any
) -> Any:
    listeners = list(_listeners)
    # torch.compile's AOTAutograd traces the backward by calling autograd.grad on fake
    # FunctionalTensors (torch 2.14): not the user's gradient computation, and those tensors
    # cannot be read later, which failed the whole trace at step 0 (tests/test_compile.py).
    if not listeners or inside_backward() or _is_compiling():
        return call(*a, **kw)
    for listener in listeners:
        listener.before_gradient(outputs, accumulate)
    result = call(*a, **kw)
    for listener in listeners:
        listener.after_gradient(outputs, accumulate, inputs, result)
    return result


def _make_engine_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def _engine_run_backward(t_outputs: Any, *args: Any, **kwargs: Any) -> Any:
        accumulate = bool(kwargs.get("accumulate_grad", True))
        inputs = args[3] if len(args) > 3 else kwargs.get("inputs")
        return _dispatch(original, t_outputs, accumulate, inputs, t_outputs, *args, **kwargs)

    _engine_run_backward.__wrapped__ = original  # type: ignore[attr-defined]
    return _engine_run_backward


def _install() -> None:
    original: Optional[Callable[..., Any]] = getattr(_autograd, "_engine_run_backward", None)
    if original is not None:
        _autograd._engine_run_backward = _make_engine_wrapper(original)  # type: ignore[attr-defined]
        _restore.append(lambda: setattr(_autograd, "_engine_run_backward", original))
        return
    # torch < 2.3: wrap the public entry points (misses `from torch.autograd import grad`).
    orig_grad, orig_backward = _autograd.grad, _autograd.backward

    def grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return _dispatch(orig_grad, outputs, False, inputs, outputs, inputs, *args, **kwargs)

    def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        return _dispatch(
            orig_backward, tensors, True, kwargs.get("inputs"), tensors, *args, **kwargs
        )

    _autograd.grad, _autograd.backward = grad, backward  # type: ignore[assignment]

    def undo() -> None:
        _autograd.grad, _autograd.backward = orig_grad, orig_backward  # type: ignore[assignment]

    _restore.append(undo)


def add_listener(listener: Any) -> Callable[[], None]:
    """Start dispatching to ``listener``; returns the function that stops it."""
    with _lock:
        if not _listeners:
            _install()
        _listeners.append(listener)

    def remove() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)
            if not _listeners:
                while _restore:
                    _restore.pop()()

    return remove


def as_tensor_list(outputs: Any) -> list[torch.Tensor]:
    """The tensors a gradient computation was called on (GradientEdges are skipped)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)):
        return [o for o in outputs if isinstance(o, torch.Tensor)]
    return []
