"""``graddiff.trace(model, path)``: record an unchanged training loop into a trace file.

Data flow: model --hooks (graddiff.hooks)--> Recorder --finished steps--> BackgroundWriter
--> HDF5. This module wires them together and guarantees the teardown: on exit, normal or by
exception, every hook and patch is removed first, then the last complete step is written and
the file is closed.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import os
import sys
import weakref
from typing import Any, Optional, Union

from torch import nn

from .environment import collect_environment
from .errors import TraceUsageError
from .hooks.autograd_hooks import add_listener
from .hooks.handles import HandleBag
from .hooks.module_hooks import install_module_hooks
from .hooks.module_settings import module_settings
from .hooks.naming import (
    ROOT_NAME,
    clean_name,
    is_compiled,
    is_wrapped_inner,
    module_display_name,
    unwrap_model,
    wrapped_module,
)
from .hooks.optimizer_hooks import add_step_hooks
from .hooks.reach import backward_hook_inventory, install_reach_hooks, merge_inventories
from .hooks.shards import flat_shards, full_parameter_counts, shard_layout
from .kinds import parse_kinds, with_buffer_start
from .launch import current_launch, resolve_path, shared_run_id
from .perturb import check_perturb, nudge_parameters
from .recorder import Recorder
from .writer import BackgroundWriter, TraceWriter

#: Default budget for full values under ``values="auto"``: 2 GiB, then statistics only.
DEFAULT_MAX_BYTES = 2 * 2**30
VALUE_MODES = ("auto", "full", "stats")
#: What ``forward_only=True`` records unless ``kinds=`` says otherwise.
FORWARD_KINDS = ("param", "input", "activation", "buffer")
#: ``replicated="one"``: only rank 0 keeps full values of what data parallelism replicates.
REPLICATED_MODES = ("all", "one")
REPLICATED_KINDS = frozenset({"param", "buffer_start", "grad", "buffer"})

_active_models: weakref.WeakSet = weakref.WeakSet()
#: Traces that end when the traced code starts its own trace of the same model (graddiff record's
#: traces give way to a script's own ``graddiff.trace``): inner model -> callback that ends them.
_gives_way: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: Called with the inner model whenever a trace starts (graddiff record notes a script's own).
_start_listeners: list = []


def give_way_to_user(inner: nn.Module, end: Any) -> None:
    """Register ``end()``: called, then forgotten, when the code starts its own trace of ``inner``."""
    _gives_way[inner] = end


def tied_parameters(inner: nn.Module, recorded: dict[str, Any]) -> dict[str, str]:
    """alias name -> recorded name, for every parameter registered under several names (tied
    weights: ``head.weight = emb.weight``). ``named_parameters()`` lists a shared tensor once,
    under its first name; the others are aliases the trace records nothing under."""
    first = {id(p): n for n, p in recorded.items()}
    out = {}
    for n, p in inner.named_parameters(remove_duplicate=False):
        n = clean_name(n)
        if id(p) in first and first[id(p)] != n:
            out[n] = first[id(p)]
    return out


def _matches(name: str, patterns: Optional[list[str]]) -> bool:
    """A module is selected when it, or one of its ancestors, matches a pattern."""
    if patterns is None:
        return True
    display = name or ROOT_NAME
    parts = name.split(".") if name else []
    candidates = [display] + [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(fnmatch.fnmatchcase(c, pat) for c in candidates for pat in patterns)


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _uses_compile(model: nn.Module, inner: nn.Module) -> bool:
    if is_compiled(model):
        return True
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in inner.modules()):
        return True
    # trace(model) while the loop calls `cmodel = torch.compile(model)`: without this, hooks
    # were skipped by the already compiled graph and inputs/activations/output grads were
    # silently not recorded (tests/test_compile.py). Only a torch.compile wrapper knows its
    # module, hence the scan (~0.1 s); only once Dynamo has compiled a frame in this process:
    # code compiled later, inside the trace, sees the hooks anyway.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
    if wrapper is None or counters is None or not counters["frames"].get("total"):
        return False
    return any(type(obj) is wrapper and unwrap_model(obj) is inner for obj in gc.get_objects())


class Tracer:
    """The object ``with graddiff.trace(...) as tr`` gives: optional ``tr.step()``, stats."""

    def __init__(
        self,
        model: nn.Module,
        path: Union[str, os.PathLike],
        *,
        kinds: Any = None,
        modules: Optional[Union[str, list[str]]] = None,
        values: str = "auto",
        max_bytes: int = DEFAULT_MAX_BYTES,
        full_steps: Optional[Any] = None,
        forward_only: bool = False,
        replicated: str = "all",
        full_kinds: Any = None,
        perturb: Optional[str] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TraceUsageError(
                f"graddiff.trace needs a torch.nn.Module, got {type(model).__name__}"
            )
        if values not in VALUE_MODES:
            raise TraceUsageError(f"values={values!r}: choose one of {', '.join(VALUE_MODES)}")
        self.forward_only = bool(forward_only)
        if self.forward_only and kinds is None:
            kinds = FORWARD_KINDS
        try:
            self.kinds = with_buffer_start(parse_kinds(kinds))
        except ValueError as exc:
            raise TraceUsageError(f"kinds: {exc}") from None
        if int(max_bytes) < 0:
            raise TraceUsageError("max_bytes must be >= 0")
        if replicated not in REPLICATED_MODES:
            raise TraceUsageError(
                f"replicated={replicated!r}: choose one of {', '.join(REPLICATED_MODES)}"
            )
        self.replicated = replicated
        try:
            self.full_kinds = parse_kinds(full_kinds) if full_kinds is not None else None
        except ValueError as exc:
            raise TraceUsageError(f"full_kinds: {exc}") from None
        self.model = model
        self.launch = current_launch()
        self._template = os.fspath(path)
        self.path = resolve_path(self._template, self.launch)
        self.modules = (
            [modules]
            if isinstance(modules, str)
            else (list(modules) if modules is not None else None)
        )
        self.values = values
        self.max_bytes = int(max_bytes)
        self.full_steps = {int(s) for s in full_steps} if full_steps is not None else None
        self.perturb = check_perturb(perturb)
        self._bag = HandleBag()
        self._recorder: Optional[Recorder] = None
        self._writer: Optional[BackgroundWriter] = None
        self._inner: Optional[nn.Module] = None
        self._compile_state: Optional[tuple[Any, bool]] = None
        self._hook_scope: Optional[tuple[list, list]] = None
        self._hooks_at_entry: dict[str, Any] = {}

    # -- public -------------------------------------------------------------------------
    def step(self) -> None:
        """End the current step now. After the first call, only these calls end steps."""
        if self._recorder is None:
            raise TraceUsageError(
                "tracer.step() called outside the `with graddiff.trace(...)` block"
            )
        self._recorder.explicit_step()

    def name_step(self, index: int) -> None:
        """Number the step about to begin ``index`` (integrations: the framework's global
        step). Ignored once the step has begun or when it would not increase."""
        if self._recorder is not None:
            self._recorder.name_step(index)

    def offer_batch(self, batch: Any) -> None:
        """The framework's training batch (integrations): recorded as ``input batch:<path>``
        in steps where the model's own forward does not run."""
        if self._recorder is not None:
            self._recorder.offer_batch(batch)

    @property
    def steps_recorded(self) -> int:
        return self._writer.steps_written if self._writer is not None else 0

    @property
    def bytes_written(self) -> int:
        return self._writer.bytes_written if self._writer is not None else 0

    def options(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kinds": list(self.kinds),
            "modules": self.modules,
            "values": self.values,
            "max_bytes": self.max_bytes,
            "full_steps": sorted(self.full_steps) if self.full_steps is not None else None,
            "perturb": self.perturb,
            "forward_only": self.forward_only,
            "replicated": self.replicated,
            "full_kinds": list(self.full_kinds) if self.full_kinds is not None else None,
        }

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        inner = unwrap_model(self.model)
        end = _gives_way.pop(inner, None)
        if end is not None and inner in _active_models:
            end()
        if inner in _active_models:
            raise TraceUsageError(
                f"{type(inner).__name__} is already being traced; graddiff.trace cannot be nested "
                "on the same model (end the outer trace first)"
            )
        # FSDP1 / checkpoint wrappers: names without their segments, the wrapper keeps the name
        named_params = [(clean_name(n), p) for n, p in inner.named_parameters()]
        named_buffers = [(clean_name(n), b) for n, b in inner.named_buffers()]
        named_modules = [
            (clean_name(n), m) for n, m in inner.named_modules() if not is_wrapped_inner(n)
        ]
        params = [(n, p) for n, p in named_params if _matches(_owner(n), self.modules)]
        buffers = [(n, b) for n, b in named_buffers if _matches(_owner(n), self.modules)]
        modules = [(n, m) for n, m in named_modules if _matches(n, self.modules)]
        if self.modules is not None and not modules:
            names = [n for n, _ in inner.named_modules() if n][:6]
            raise TraceUsageError(
                f"modules={self.modules!r} matches no module of {type(inner).__name__} "
                f"(its modules are named e.g. {', '.join(names) or '(none: no submodules)'}); "
                "nothing but inputs and losses would be recorded"
            )
        environment = collect_environment(inner, self.options())
        counts = full_parameter_counts(inner)  # FSDP1: the unsharded model's, as DDP's
        if counts is not None:
            environment["n_parameters"], environment["n_trainable_parameters"] = counts
        environment["run_id"] = shared_run_id(self.launch, self._template)
        options = self.options()
        try:
            self._writer = BackgroundWriter(lambda: TraceWriter(self.path, environment, options))
        except Exception as exc:
            why = " ".join(str(exc).split())[:300]  # HDF5's messages span lines
            raise TraceUsageError(f"{self.path}: cannot create the trace file ({why})") from None
        # FSDP2 / DTensor, FSDP1 flat shards: where this rank's shards sit
        flat_layout, flat_pieces = flat_shards(inner)
        layout = {**shard_layout(params), **flat_layout}
        traced = {id(p) for _, p in params}
        flat_pieces = {k: v for k, v in flat_pieces.items() if k in traced}
        if layout:
            self._writer.set_attr("shards", json.dumps(layout, sort_keys=True))
        # module classes (the wrapped module's, under FSDP1): shown with every record name;
        # evidence for --map auto
        classes = {module_display_name(n): type(wrapped_module(m)).__name__ for n, m in modules}
        self._writer.set_attr("module_classes", json.dumps(classes))
        # module settings (extra_repr: eps, momentum, p, approximate, ...): evidence for
        # compare's module_config cause
        self._writer.set_attr(
            "module_settings",
            json.dumps({module_display_name(n): t for n, t in module_settings(modules).items()}),
        )
        # parameter aliasing (tied weights): evidence for compare's tied_weights cause
        self._writer.set_attr(
            "tied_parameters", json.dumps(tied_parameters(inner, dict(params)), sort_keys=True)
        )
        # the user's backward hooks (before graddiff adds its own): evidence for backward_hook
        display_modules = [(module_display_name(n), m) for n, m in modules]
        self._hook_scope = (display_modules, params)
        try:
            self._hooks_at_entry = backward_hook_inventory(display_modules, params)
            self._writer.set_attr(
                "backward_hooks", json.dumps(self._hooks_at_entry, sort_keys=True)
            )
        except Exception:  # evidence only: never refuse a trace over it (absent: unknown)
            self._hook_scope = None
        self._recorder = Recorder(
            writer=self._writer,
            params=params,
            buffers=buffers,
            flat_pieces=flat_pieces,
            sharded=frozenset(layout),
            kinds=self.kinds,
            values=self.values,
            max_bytes=self.max_bytes,
            full_steps=self.full_steps,
            forward_only=self.forward_only,
            stats_only_kinds=(
                REPLICATED_KINDS
                if self.replicated == "one" and self.launch.distributed and self.launch.rank != 0
                else frozenset()
            ),
            full_kinds=self.full_kinds,
        )
        self._inner = inner
        _active_models.add(inner)
        for listener in list(_start_listeners):
            listener(inner)
        try:
            compiled = _uses_compile(self.model, inner)
            if compiled:
                self._prepare_compile()
            install_module_hooks(
                inner, modules, self._recorder, self._bag, compiled=compiled, every=named_modules
            )
            add_step_hooks(self._recorder, self._bag)
            self._bag.add(add_listener(self._recorder))
            if not self.forward_only and "grad" in self.kinds:
                unflat = [(n, p) for n, p in params if id(p) not in flat_pieces]
                self._recorder.counts_reach = install_reach_hooks(unflat, self._recorder, self._bag)
            if self.perturb is not None:  # a twin run: nudge last, once everything is in place
                nudge_parameters(inner, self.perturb)
        except BaseException:
            self._teardown(completed=False, status="aborted: graddiff could not install its hooks")
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._teardown(completed=True, status="complete")
        else:
            self._teardown(
                completed=False, status=f"aborted: the traced code raised {exc_type.__name__}"
            )

    def _teardown(self, *, completed: bool, status: str) -> None:
        """Hooks off first, then the last step, then the file. Runs once."""
        try:
            self._bag.remove()
            self._record_hooks_at_exit()
        finally:
            if self._compile_state is not None:
                self._restore_compile()
            if self._inner is not None:
                _active_models.discard(self._inner)
                _gives_way.pop(self._inner, None)
            recorder, writer = self._recorder, self._writer
            self._recorder = None
            if recorder is not None:
                recorder.finish(completed)
                if recorder.failure is not None:
                    status = f"stopped: {recorder.failure}"
            if writer is not None:
                writer.close(status)

    def _record_hooks_at_exit(self) -> None:
        """Add the user's backward hooks registered during the run (graddiff's are off)."""
        if self._writer is None or self._hook_scope is None:
            return
        try:
            now = backward_hook_inventory(*self._hook_scope)
            if now != self._hooks_at_entry:
                both = merge_inventories(self._hooks_at_entry, now)
                self._writer.set_attr("backward_hooks", json.dumps(both, sort_keys=True))
        except Exception:  # evidence only: never fail the user's run over it
            pass

    # torch.compile: module hooks added after compilation are silently skipped unless Dynamo
    # guards on them and recompiles (FIELD-NOTES 6). This forces one recompile, on entry and exit.
    def _prepare_compile(self) -> None:
        import torch._dynamo as dynamo

        old = getattr(dynamo.config, "skip_nnmodule_hook_guards", None)
        self._compile_state = (dynamo, old)
        if old is not None:
            dynamo.config.skip_nnmodule_hook_guards = False
        dynamo.reset()

    def _restore_compile(self) -> None:
        assert self._compile_state is not None
        dynamo, old = self._compile_state
        self._compile_state = None
        dynamo.reset()
        if old is not None:
            dynamo.config.skip_nnmodule_hook_guards = old


def trace(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    kinds: Any = None,
    modules: Optional[Union[str, list[str]]] = None,
    values: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
    full_steps: Optional[Any] = None,
    forward_only: bool = False,
    replicated: str = "all",
    full_kinds: Any = None,
    perturb: Optional[str] = None,
) -> Tracer:
    """Record a training run into ``path`` while the ``with`` block runs.

    Args:
        model: the model being trained (compiled, DDP and DataParallel wrappers are unwrapped).
        path: the trace file; ``{rank}``, ``{local_rank}``, ``{world_size}`` and ``{node}``
            are replaced (``graddiff.launch``); under a distributed launch a path without
            ``{rank}`` gets ``_rank{rank}`` inserted before its extension, with a warning.
        kinds: kinds to record (default all): param, buffer_start, input, activation, loss,
            grad_output, grad, autograd_grad, buffer; a list or a comma-separated string
            ("buffer" also records buffer_start).
        modules: glob patterns of module names (a match includes its submodules); default all.
        values: "auto" (full values until ``max_bytes`` is spent, then statistics only),
            "full", or "stats" (fingerprints and statistics only).
        max_bytes: the full-values budget of ``values="auto"``.
        full_steps: store full values exactly at these steps (statistics elsewhere).
        forward_only: every call of the model is one step, recorded also under
            ``torch.no_grad()`` (parameters, inputs, module outputs, buffers; no gradients):
            compare two implementations on one batch before training them.
        replicated: "all", or "one": under a distributed launch, parameters, buffers and
            ``.grad`` (replicated by data parallelism) keep full values on rank 0 only; the
            other ranks record their fingerprints and statistics (``graddiff ranks`` needs no
            more). Sharded parameters (FSDP2) are not replicated and keep their values.
        full_kinds: in steps that keep full values, keep them only for these kinds (e.g.
            ``("param", "grad")``: parameters and gradients in full, activations as
            statistics); default every recorded kind. The budget counts only what is kept.
        perturb: record a perturbed twin for ``compare --noise``: "ulp" nudges every float
            parameter element by one ulp of its dtype, up or down by a fixed hash of its
            position, at trace entry ("bfloat16"/"float16": one ulp of that precision, for the
            twin of an autocast run); no random numbers drawn, nothing else changed.

    Returns:
        A :class:`Tracer`; ``tr.step()`` ends a step explicitly.
    """
    return Tracer(
        model,
        path,
        kinds=kinds,
        modules=modules,
        values=values,
        max_bytes=max_bytes,
        full_steps=full_steps,
        forward_only=forward_only,
        replicated=replicated,
        full_kinds=full_kinds,
        perturb=perturb,
    )
