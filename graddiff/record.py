"""``graddiff record``: trace an unmodified training script, run in this process.

The script runs as ``__main__`` (``runpy``, like ``coverage run`` or ``python -m cProfile``).
Models are found where training starts: every optimizer constructed while the script runs is
looked at once, its parameters are mapped back to the ``nn.Module`` trees that own them, and
the top module of each tree is traced (``graddiff.trace``) from then until the script ends.
``--model-class`` and ``--model`` choose which module instead. Everything patched is restored
when the script ends, however it ends; the script's exit code is the result.
"""

from __future__ import annotations

import gc
import os
import re
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .errors import GraddiffError
from .hooks.naming import unwrap_model
from .hooks.optimizer_hooks import optimizer_params
from .tracer import Tracer, _active_models, _start_listeners, give_way_to_user

Notify = Callable[[str], None]

_PYTHON = re.compile(r"^python[0-9.]*$")


def parse_command(command: list[str]) -> tuple[str, str, list[str]]:
    """``python train.py ARGS`` / ``train.py ARGS`` / ``python -m pkg ARGS`` -> (how, target, args)."""
    if not command:
        raise GraddiffError(
            "no command to run: graddiff record -o run.h5 -- python train.py [ARGS]"
        )
    args = list(command)
    first = args[0]
    if _PYTHON.match(os.path.basename(first)) or os.path.abspath(first) == os.path.abspath(
        sys.executable
    ):
        args = args[1:]
        while args and args[0] == "-u":  # unbuffered output: what record does anyway
            args = args[1:]
        if args and args[0].startswith("-") and args[0] != "-m":
            raise GraddiffError(
                f"python option {args[0]!r} is not supported by graddiff record; "
                "run: graddiff record -o run.h5 -- python train.py [ARGS]"
            )
        if not args:
            raise GraddiffError(
                "no script to run after 'python': graddiff record -o run.h5 -- python train.py"
            )
    if args[0] == "-m":
        if len(args) < 2:
            raise GraddiffError(
                "-m needs a module name: graddiff record -o run.h5 -- python -m pkg.train"
            )
        return "module", args[1], args[2:]
    script = args[0]
    if not os.path.isfile(script):
        hint = (
            " (graddiff record runs a Python script in its own process; under torchrun: "
            "torchrun ... -m graddiff record -o run_{rank}.h5 -- train.py [ARGS])"
            if not script.endswith(".py")
            else ""
        )
        raise GraddiffError(f"{script}: no such script{hint}")
    return "script", script, args[1:]


def _live_modules() -> list[nn.Module]:
    # type(), not isinstance: isinstance reads __class__, which some lazy module-level objects
    # answer with a deprecation warning (torch.distributed.reduce_op).
    return [o for o in gc.get_objects() if issubclass(type(o), nn.Module)]


def _roots(modules: list[nn.Module]) -> list[nn.Module]:
    """Modules that are nobody's child: the top of each module tree."""
    children = {id(c) for m in modules for c in m._modules.values() if c is not None}
    return [m for m in modules if id(m) not in children]


def _outermost(matches: list[nn.Module]) -> list[nn.Module]:
    inner = {id(c) for m in matches for c in m.modules() if c is not m}
    return [m for m in matches if id(m) not in inner]


def _resolve(path: str) -> Any:
    """``module.attr.attr`` -> the object, or None while it does not exist (yet)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


class ModelFinder:
    """Maps each new optimizer's parameters to the module(s) to trace."""

    def __init__(self, model_class: Optional[str], model_attr: Optional[str], notify: Notify):
        self.model_class = model_class
        self.model_attr = model_attr
        self.notify = notify
        self.unowned_warned = False

    def models_for(self, optimizer: torch.optim.Optimizer) -> list[nn.Module]:
        wanted = {id(p) for p in optimizer_params(optimizer)}
        if not wanted:
            return []
        if self.model_attr:
            obj = _resolve(self.model_attr)
            if isinstance(obj, nn.Module) and wanted & {id(p) for p in obj.parameters()}:
                return [obj]
            return []
        modules = _live_modules()
        if self.model_class:
            candidates = _outermost(
                [
                    m
                    for m in modules
                    if self.model_class in (type(m).__name__, type(m).__qualname__)
                    or self.model_class == f"{type(m).__module__}.{type(m).__qualname__}"
                ]
            )
        else:
            candidates = _roots(modules)
        found, owned = [], set()
        for m in candidates:
            ids = {id(p) for p in m.parameters()} & wanted
            if ids:
                found.append(m)
                owned |= ids
        if not self.model_class and not self.unowned_warned and wanted - owned:
            self.unowned_warned = True
            self.notify(
                f"{len(wanted - owned)} optimizer parameter(s) belong to no nn.Module; "
                "they are not recorded"
            )
        return found


class Recording:
    """The traces of one ``graddiff record`` run: one per model found, started when found."""

    def __init__(
        self,
        output: str,
        trace_options: dict[str, Any],
        finder: ModelFinder,
        notify: Notify,
    ) -> None:
        self.output = output
        self.trace_options = trace_options
        self.finder = finder
        self.notify = notify
        self.traces: list[tuple[nn.Module, Tracer]] = []
        self.paths: list[str] = []
        self.left_to_script: list[str] = []
        self.optimizers = 0
        self.failures: list[str] = []
        self.script_traces = 0  # graddiff.trace blocks the script entered itself
        self._own_start = False
        self._seen: set[int] = set()
        self._busy = False

    # -- discovery -----------------------------------------------------------------------------
    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self._busy:  # an optimizer built inside another's constructor
            return
        self._busy = True
        try:
            self.optimizers += 1
            for model in self.finder.models_for(optimizer):
                self._start(model)
        except Exception as exc:  # never break the script being recorded
            self.failures.append(f"{type(exc).__name__}: {exc}")
            self.notify(f"not recording: {exc}")
        finally:
            self._busy = False

    def on_trace_started(self, inner: nn.Module) -> None:
        if not self._own_start:
            self.script_traces += 1

    def _path_for(self, model: nn.Module) -> str:
        name = type(unwrap_model(model)).__name__
        if "{model}" in self.output:
            path = self.output.replace("{model}", name)
        elif not self.traces:
            path = self.output
        else:
            stem, suffix = os.path.splitext(self.output)
            path = f"{stem}.{name}{suffix or '.h5'}"
        base, n = path, 2
        while path in self.paths:
            stem, suffix = os.path.splitext(base)
            path, n = f"{stem}{n}{suffix}", n + 1
        return path

    def _start(self, model: nn.Module) -> None:
        inner = unwrap_model(model)
        if id(inner) in self._seen:
            return
        self._seen.add(id(inner))
        label = type(inner).__name__
        if inner in _active_models:
            self.left_to_script.append(label)
            self.notify(
                f"{label} is traced by the script itself (graddiff.trace); record leaves it to the script"
            )
            return
        path = self._path_for(model)
        tracer = Tracer(model, path, **self.trace_options)
        self._own_start = True
        try:
            tracer.__enter__()
        finally:
            self._own_start = False
        self.traces.append((inner, tracer))
        self.paths.append(tracer.path)
        give_way_to_user(inner, lambda: self._give_way(inner, tracer))
        self.notify(f"recording {label} into {tracer.path}")

    def _give_way(self, inner: nn.Module, tracer: Tracer) -> None:
        """The script started its own graddiff.trace on a model record was tracing."""
        label = type(inner).__name__
        tracer.__exit__(None, None, None)
        self.traces = [(m, t) for m, t in self.traces if t is not tracer]
        if tracer.steps_recorded == 0 and os.path.exists(tracer.path):
            os.unlink(tracer.path)
            self.paths.remove(tracer.path)
        self.left_to_script.append(label)
        self.notify(
            f"{label} is traced by the script itself (graddiff.trace); record leaves it to the script"
        )

    # -- the end -------------------------------------------------------------------------------
    def close(self, exc_type: Any = None, exc: Any = None) -> None:
        for _, tracer in reversed(self.traces):
            tracer.__exit__(exc_type, exc, None)
        self.traces = []


def _patch_optimizers(on_new: Callable[[Any], None]) -> Callable[[], None]:
    """Call ``on_new(optimizer)`` after every optimizer constructor; returns the undo."""
    original = torch.optim.Optimizer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        on_new(self)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    torch.optim.Optimizer.__init__ = __init__  # type: ignore[method-assign]

    def undo() -> None:
        torch.optim.Optimizer.__init__ = original  # type: ignore[method-assign]

    return undo


def _exit_code(exc: SystemExit, err: Any) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=err)  # sys.exit("message"): Python prints it and exits 1
    return 1


def _print_script_traceback(exc: BaseException, err: Any) -> None:
    """The script's own traceback, as Python would print it, without record's frames."""
    tb = exc.__traceback__
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}

    def is_ours(filename: str) -> bool:
        return filename in ours or os.path.abspath(filename) in ours

    while tb is not None and is_ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb, file=err)


def run(
    command: list[str],
    output: str,
    *,
    trace_options: dict[str, Any],
    model_class: Optional[str] = None,
    model_attr: Optional[str] = None,
    notify: Notify,
    err: Any = None,
) -> tuple[int, Recording]:
    """Run the command's script in this process under tracing; return (its exit code, recording)."""
    err = err if err is not None else sys.stderr
    how, target, args = parse_command(command)
    finder = ModelFinder(model_class, model_attr, notify)
    recording = Recording(output, trace_options, finder, notify)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    main_module = sys.modules.get("__main__")
    undo = _patch_optimizers(recording.on_optimizer)
    _start_listeners.append(recording.on_trace_started)
    code, failure = 0, None
    try:
        if how == "script":
            sys.argv = [target, *args]
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv = [target, *args]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc, err)
        failure = exc if code else None
    except KeyboardInterrupt as exc:
        code, failure = 130, exc
        _print_script_traceback(exc, err)
    except BaseException as exc:  # the script's own error: shown as Python shows it
        code, failure = 1, exc
        _print_script_traceback(exc, err)
    finally:
        undo()
        _start_listeners.remove(recording.on_trace_started)
        try:
            recording.close(type(failure) if failure is not None else None, failure)
        finally:
            sys.argv[:] = saved_argv
            sys.path[:] = saved_path
            if main_module is not None:
                sys.modules["__main__"] = main_module
    return code, recording
