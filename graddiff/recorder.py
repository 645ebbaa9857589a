"""The recorder: turns hook events into finished steps for the writer.

Data flow: hooks --events--> Recorder (+ StepClock decides boundaries) --one finished step-->
BackgroundWriter. It owns the current step's entries, the per-step call counters, the
full-values policy (``values``, ``max_bytes``, ``full_steps``) and what is captured when:
parameters at the step's first forward, inputs/activations/output grads as they happen,
losses and ``autograd.grad`` outputs at each gradient computation, ``.grad`` at
``optimizer.step()`` (or after each backward without an optimizer; after each call of the
closure of ``optimizer.step(closure)``), buffers at the step's start (``buffer_start``, with the
parameters) and at its end (``buffer``).

Every event handler is guarded: an internal error stops recording with one warning and never
reaches the user's training code.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch

from ._warn import warn_user
from .arena import Arena, ArenaPool
from .entries import EntryData
from .format import FLAG_TRAINING
from .hooks.autograd_hooks import as_tensor_list, inside_backward
from .hooks.device_stats import DeviceStatsBatch
from .hooks.naming import flatten_tensors, record_name
from .hooks.optim_settings import SettingsWatch
from .hooks.optimizer_hooks import optimizer_params
from .hooks.reach import custom_functions
from .hooks.shards import FlatPieces, local_tensor
from .hooks.snapshot import capture
from .kinds import Kind
from .steps import StepClock

# Kind values as plain strings: ``Kind.X.value`` is an enum descriptor lookup on every hook call.
_K_ACTIVATION = Kind.ACTIVATION.value
_K_AUTOGRAD_GRAD = Kind.AUTOGRAD_GRAD.value
_K_BUFFER = Kind.BUFFER.value
_K_BUFFER_START = Kind.BUFFER_START.value
_K_GRAD = Kind.GRAD.value
_K_GRAD_OUTPUT = Kind.GRAD_OUTPUT.value
_K_INPUT = Kind.INPUT.value
_K_LOSS = Kind.LOSS.value
_K_PARAM = Kind.PARAM.value


class AliasEntry(EntryData):
    """The same tensor seen twice in a step (a container and its last child return one
    tensor): shares the first capture's stats, fingerprint and stored bytes."""

    def __init__(
        self, source: EntryData, kind: str, name: str, call: int, seq: int, flags: int
    ) -> None:
        super().__init__(
            kind=kind,
            name=name,
            call=call,
            dtype=source.dtype,
            shape=source.shape,
            stats=source.stats,
            fingerprint=source.fingerprint,
            flags=flags,
            seq=seq,
        )
        self._source = source

    @property
    def dropped(self) -> bool:
        """Dropped with its source (``DeviceStatsBatch.settle``)."""
        return getattr(self._source, "dropped", False)

    def resolve(self) -> EntryData:
        src = self._source.resolve()
        self.stats, self.fingerprint, self.values = src.stats, src.fingerprint, src.values
        return self


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a hook handler; on an internal error stop recording instead of raising."""

    @functools.wraps(method)
    def wrapper(self: Recorder, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.fail(f"internal error in {method.__name__}: {type(exc).__name__}: {exc}")
            return None

    return wrapper


class Recorder:
    """Collects one step at a time and hands finished steps to the writer."""

    def __init__(
        self,
        *,
        writer: Any,
        params: list[tuple[str, torch.nn.Parameter]],
        buffers: list[tuple[str, torch.Tensor]],
        kinds: Iterable[str],
        values: str,
        max_bytes: int,
        full_steps: Optional[set[int]],
        full_kinds: Optional[Iterable[str]] = None,
        forward_only: bool = False,
        stats_only_kinds: frozenset = frozenset(),
        flat_pieces: Optional[dict[int, FlatPieces]] = None,
        sharded: frozenset = frozenset(),
    ) -> None:
        self.writer = writer
        # FSDP1 use_orig_params=False: FlatParameter (by id) -> its original parameters' pieces
        self._flat_pieces = flat_pieces or {}
        # names of sharded parameters (FSDP, DTensor): each rank's own piece, never replicated,
        # so stats_only_kinds (replicated="one") does not apply to them
        self._sharded = sharded
        # forward_only: every call of the model is one step, recorded with or without grad
        # (ports compared on one batch before any training); gradients are not recorded.
        self.forward_only = forward_only
        self.params = params
        self.buffers = buffers
        self._param_by_id = {id(p): (name, p) for name, p in params}
        self.kinds = frozenset(kinds)
        self.values = values
        self.max_bytes = max_bytes
        self.full_steps = full_steps
        self.stats_only_kinds = stats_only_kinds  # replicated="one" on ranks other than 0
        # Kinds whose full values are kept in full-values steps (None: every kind).
        self.full_kinds = frozenset(full_kinds) if full_kinds is not None else None
        self.clock = StepClock()
        self.optimizer_seen = False
        # A few small trainable parameters whose change reveals a manual update (see steps.py).
        trainable = sorted((p for _, p in params if p.requires_grad), key=lambda p: p.numel())
        self._probes: list[torch.Tensor] = [local_tensor(p) for p in trainable[:3]]
        self._probe_values: list[tuple[int, torch.Tensor]] = []
        self.active = True
        self.failure: Optional[str] = None
        self.steps_submitted = 0
        self.full_bytes = 0
        self._budget_note: Optional[str] = None
        self._lock = threading.RLock()
        self._forward_depth: list[bool] = []
        # the submodules' outermost-call hooks (module_hooks), until the root's forward runs
        self.outer_hooks: Any = None
        self._outer_depth = 0  # traced submodule calls running (while outer_hooks is set)
        self._tensor_handles: list[Any] = []
        self._old_tensor_handles: list[Any] = []
        self._optimizer_params: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._device_batch = DeviceStatsBatch()  # accelerator stats: one transfer per step
        self._arenas = ArenaPool()  # full values: one reused staging buffer per step
        self._arena: Optional[Arena] = None
        self._closure_steps: set[int] = set()  # optimizers inside a wrapped step(closure)
        # optimizer settings per step (changes only); None once it failed
        self._settings: Optional[SettingsWatch] = SettingsWatch(self._param_by_id)
        self._settings_hooks = self._settings  # its load hooks, removed at finish()
        # backward passes that accumulated into each parameter's .grad this step
        # (hooks/reach.py); written when they change, once counting hooks are installed
        self.counts_reach = False
        self._reach_last: Optional[dict[str, int]] = None
        # custom autograd Functions in the first step's graphs (hooks/reach.py); None: done
        self._functions: Optional[tuple[set[str], bool]] = (set(), True)
        self._reset_step_state()

    # -- per-step state -----------------------------------------------------------------
    def _reset_step_state(self) -> None:
        self._entries: list[EntryData] = []
        self._calls: dict[tuple[str, str], int] = {}
        self._grad_output_calls: dict[str, set[int]] = {}
        self._pending_grads: dict[tuple[str, int], EntryData] = {}
        # id -> (weak reference, _version, entry): a strong reference would keep every
        # activation and output gradient of the step alive until its end (more memory, and
        # page faults when the allocator returns it to the OS and takes it back every step).
        self._aliases: dict[int, tuple[weakref.ref, int, EntryData]] = {}
        self._seq = 0
        self._step_full = False
        self._batches: list[Any] = []  # offered by a framework callback (offer_batch)
        self._forward_ran = False  # the model's own forward ran with grad in this step
        self._outer_inputs: list[EntryData] = []  # inputs of outermost submodule calls
        self._arena = None  # taken at the step's first full-values capture
        self._reach: dict[str, int] = {}

    def _next_call(self, kind: str, name: str) -> int:
        key = (kind, name)
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        return call

    def _decide_full(self, step: int) -> bool:
        if self.full_steps is not None:
            return step in self.full_steps
        if self.values == "full":
            return True
        if self.values == "stats":
            return False
        if self.full_bytes < self.max_bytes:
            return True
        if self._budget_note is None:
            self._budget_note = (
                f"full values for steps 0..{step - 1}, statistics only from step {step} "
                f"(max_bytes={self.max_bytes} reached)"
            )
            self.writer.set_attr("values_note", self._budget_note)
            warn_user(
                f"graddiff: {self._budget_note}; raise max_bytes= or pass full_steps=[...] "
                f"to keep values where you need them"
            )
        return False

    def _ensure_started(self) -> None:
        if self.clock.started:
            return
        self.clock.started = True
        self._step_full = self._decide_full(self.clock.step)
        if not self.optimizer_seen:
            self._probe_values = [(p._version, p.detach().clone()) for p in self._probes]
        with self._device_batch.group():  # no user code runs here: one launch per dtype
            if _K_PARAM in self.kinds:
                for name, p in self.params:
                    for piece_name, t in self._pieces(name, p, p, keep_empty=True):
                        self._record(_K_PARAM, piece_name, t, call=0)
            if _K_BUFFER_START in self.kinds:
                # Where params are: replicas that sync buffers (DDP broadcast_buffers) agree
                # here and not at the step's end, where each rank's own batch has updated them.
                for name, buf in self.buffers:
                    self._record(_K_BUFFER_START, name, buf, call=0)

    def _record(
        self,
        kind: str,
        name: str,
        tensor: torch.Tensor,
        *,
        call: int,
        flags: int = 0,
        alias: bool = False,
    ) -> EntryData:
        with self._lock:
            cached = self._aliases.get(id(tensor)) if alias else None
            if cached is not None and cached[0]() is tensor and cached[1] == tensor._version:
                entry: EntryData = AliasEntry(cached[2], kind, name, call, self._seq, flags)
            else:
                entry = self._capture(kind, name, tensor, call=call, seq=self._seq, flags=flags)
                if alias:
                    self._aliases[id(tensor)] = (weakref.ref(tensor), tensor._version, entry)
            self._seq += 1
            self._entries.append(entry)
            return entry

    def _capture(
        self, kind: str, name: str, tensor: torch.Tensor, *, call: int, seq: int, flags: int
    ) -> EntryData:
        """Snapshot with the step's values policy, counting the full-values budget.

        Stats-only CPU tensors are summarised here, in place: copying them and summarising on
        the writer thread was measured slower (1.45x vs 1.28x untraced on the seed MLP),
        because the writer's reads compete with the training threads for the cores.
        """
        local = local_tensor(tensor)  # a DTensor's own shard: no DTensor op in a hook
        keep = self._step_full and (
            kind not in self.stats_only_kinds or local is not tensor or name in self._sharded
        )
        keep = keep and (self.full_kinds is None or kind in self.full_kinds)
        arena = None
        if keep:
            self.full_bytes += local.numel() * local.element_size()
            arena = self._arena
            if arena is None:
                arena = self._arena = self._arenas.acquire()
        entry = capture(
            kind,
            name,
            local,
            call=call,
            seq=seq,
            flags=flags,
            keep_values=keep,
            batch=self._device_batch,
            arena=arena,
        )
        return entry

    def _end_step(self) -> None:
        if not self.clock.started:
            return
        with self._lock:
            entries = self._entries
            self._record_offered_batches()
            for entry in self._pending_grads.values():
                entry.seq = self._seq
                self._seq += 1
                entries.append(entry)
            if _K_BUFFER in self.kinds:
                with self._device_batch.group():
                    for name, buf in self.buffers:
                        entries.append(
                            self._capture(_K_BUFFER, name, buf, call=0, seq=self._seq, flags=0)
                        )
                        self._seq += 1
            step = self.clock.step
            arena = self._arena
            reach = self._reach
            flushes = self._device_batch.flushes
            self._device_batch.flush()
            # statistics only, nothing waiting on a device: the writer may take it at once
            ready = arena is None and self._device_batch.flushes == flushes
            if self._device_batch.take_dropped():  # changed in place before their launch
                entries = [e for e in entries if not getattr(e, "dropped", False)]
            self._reset_step_state()
            self.clock.advance()
            # Output-gradient hooks of the step before last can no longer fire usefully.
            for handle in self._old_tensor_handles:
                handle.remove()
            self._old_tensor_handles, self._tensor_handles = self._tensor_handles, []
            settings = self._settings.take() if self._settings is not None else None
        extra: dict[str, Any] = {}  # keywords only when given (wrappers of submit)
        if settings:
            extra["optimizer"] = settings
        if arena is not None:
            extra["arena"] = arena
        if self._functions is not None:  # the first step's graphs: written once
            names, whole = self._functions
            self._functions = None
            self.writer.set_attr(
                "custom_functions", json.dumps({"names": sorted(names), "complete": whole})
            )
        if self.counts_reach and reach != self._reach_last:
            extra["reach"] = self._reach_last = reach
        if ready:
            extra["inline"] = True
        self.writer.submit(step, entries, **extra)
        self.steps_submitted += 1

    # -- events from the hooks -------------------------------------------------------------
    @_guarded
    def on_model_forward(self, args: Any, kwargs: Any) -> None:
        grad = torch.is_grad_enabled() and not inside_backward()
        if self.outer_hooks is not None and self.forward_only:
            self._drop_outer_hooks()
        if self.forward_only:
            # A step ends when the next model call begins (or at trace exit), not at the end
            # of this one: the root module's own output hook fires after the forward-end hook.
            outer = not self._forward_depth and not inside_backward()
            self._forward_depth.append(False)
            if outer:
                self._end_step()
                self._ensure_started()
                self._record_inputs(args, kwargs)
            return
        self._forward_depth.append(grad)
        if not grad:
            return
        if self.clock.forward(True, self._params_changed):
            self._end_step()
        if self.outer_hooks is not None:  # the model is called as a whole: its inputs
            self._drop_outer_hooks()
        self._ensure_started()
        self._record_inputs(args, kwargs)

    def _drop_outer_hooks(self) -> None:
        """The model's own forward runs: remove the outermost-call hooks, and this step's
        inputs taken from them (every step has the root's inputs from now on, so two runs of
        one computation have the same records whichever module their code called first)."""
        hooks, self.outer_hooks = self.outer_hooks, None
        self._outer_depth = 0
        hooks.remove()
        if self._outer_inputs:
            with self._lock:
                drop = {id(e) for e in self._outer_inputs}
                self._entries = [e for e in self._entries if id(e) not in drop]
                self._outer_inputs = []

    @_guarded
    def on_outer_call(self, name: str, args: Any, kwargs: Any) -> None:
        """A traced submodule is called while the model's own forward has not run with grad
        yet: the arguments of an outermost call (no traced call around it) are the step's
        inputs, ``<module>:<path>`` (the root's forward never runs when, e.g., a
        LightningModule's ``training_step`` calls ``self.net(x)``)."""
        depth = self._outer_depth
        self._outer_depth = depth + 1
        if depth or self.forward_only or not torch.is_grad_enabled() or inside_backward():
            return
        self._ensure_started()
        if _K_INPUT in self.kinds:
            for path, t in flatten_tensors(list(args)) + flatten_tensors(dict(kwargs or {})):
                rname = record_name(name, path)
                self._outer_inputs.append(
                    self._record(
                        _K_INPUT, rname, t, call=self._next_call("input", rname), alias=True
                    )
                )

    def on_outer_call_end(self) -> None:
        if self._outer_depth:
            self._outer_depth -= 1

    def _record_inputs(self, args: Any, kwargs: Any) -> None:
        self._forward_ran = True
        if _K_INPUT in self.kinds:
            for path, t in flatten_tensors(list(args)) + flatten_tensors(dict(kwargs or {})):
                self._record(_K_INPUT, path, t, call=self._next_call("input", path), alias=True)

    def _params_changed(self) -> bool:
        """Did a manual update touch the probe parameters since the step began?"""
        for p, (version, saved) in zip(self._probes, self._probe_values):
            # _version misses `p.data -= ...` (FIELD-NOTES 3), so compare values as well.
            if p._version != version or not torch.equal(p.detach(), saved):
                return True
        return False

    @_guarded
    def on_model_forward_end(self) -> None:
        if self._forward_depth:
            self._forward_depth.pop()
            if not self._forward_depth:  # the forward's deferred device statistics: now
                self._settle_device()

    def _settle_device(self) -> None:
        """Launch the accelerator statistics deferred since the last pass ended (nothing to
        do on CPU: ``DeviceStatsBatch.settle``)."""
        with self._lock:
            self._device_batch.settle()

    # The two handlers below run once per module output and once per output gradient, the
    # bulk of a step's records: guarded inline (no wrapper frame), a plain tensor output
    # without flattening, and the gradient hook a ``partial`` of the bound handler (no
    # closure frame). Same records as the general path.
    def on_module_output(self, name: str, module: torch.nn.Module, output: Any) -> None:
        if not self.active:
            return None
        try:
            if inside_backward():  # gradient-checkpoint recompute (FIELD-NOTES 5)
                return None
            grad = torch.is_grad_enabled()
            if self.forward_only:
                if not self.clock.started:
                    return None
            elif not grad and not any(self._forward_depth):
                return None
            if not self.clock.started:
                self._ensure_started()
            flags = FLAG_TRAINING if module.training else 0
            kinds = self.kinds
            want_act = _K_ACTIVATION in kinds
            want_go = grad and _K_GRAD_OUTPUT in kinds and not self.forward_only
            outputs = (
                ((name, output),)
                if isinstance(output, torch.Tensor)
                else [(record_name(name, path), t) for path, t in flatten_tensors(output)]
            )
            calls = self._calls
            for rname, t in outputs:
                key = ("forward", rname)
                call = calls.get(key, 0)
                calls[key] = call + 1
                if want_act:
                    self._record(_K_ACTIVATION, rname, t, call=call, flags=flags, alias=True)
                if want_go and t.requires_grad:
                    # a partial of a handler that returns None: a non-None return would
                    # replace the gradient
                    self._tensor_handles.append(
                        t.register_hook(functools.partial(self.on_grad_output, rname, call))
                    )
        except Exception as exc:
            self.fail(f"internal error in on_module_output: {type(exc).__name__}: {exc}")
        return None

    def on_grad_output(self, rname: str, call: int, grad: torch.Tensor) -> None:
        if not self.active:
            return None
        try:
            with self._lock:
                used = self._grad_output_calls.get(rname)
                if used is None:
                    self._grad_output_calls[rname] = {call}
                else:
                    if call in used:  # a second gradient for one output (double backward)
                        call = max(used) + 1  # a fresh index
                    used.add(call)
                self._record(_K_GRAD_OUTPUT, rname, grad, call=call, alias=True)
        except Exception as exc:
            self.fail(f"internal error in on_grad_output: {type(exc).__name__}: {exc}")
        return None

    def on_accumulate(self, name: str, param: Any = None) -> None:
        """A backward pass accumulated into ``name``'s .grad (hooks/reach.py); reads nothing
        of ``param``."""
        if self.active:
            reach = self._reach
            reach[name] = reach.get(name, 0) + 1

    @_guarded
    def before_gradient(self, outputs: Any, accumulate: bool) -> None:
        if self.forward_only:
            return
        self._ensure_started()
        if self._functions is not None:
            names, whole = custom_functions(as_tensor_list(outputs))
            self._functions = (self._functions[0] | names, self._functions[1] and whole)
        if _K_LOSS in self.kinds:
            tensors = as_tensor_list(outputs)
            for i, t in enumerate(tensors):
                name = "loss" if len(tensors) == 1 else f"loss:{i}"
                self._record(_K_LOSS, name, t, call=self._next_call("loss", name))

    @_guarded
    def after_gradient(self, outputs: Any, accumulate: bool, inputs: Any, result: Any) -> None:
        if self.forward_only:
            return
        self._settle_device()  # the output gradients' deferred device statistics
        self.clock.gradient()
        if not accumulate:
            if _K_AUTOGRAD_GRAD not in self.kinds or result is None:
                return
            ins = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            for i, (inp, g) in enumerate(zip(ins, result)):
                if not isinstance(g, torch.Tensor):
                    continue
                hit = self._param_by_id.get(id(inp))
                if hit is not None and hit[1] is inp:
                    name = hit[0]
                elif isinstance(inp, torch.nn.Parameter):
                    continue  # a parameter outside the traced selection
                else:
                    name = f"input[{i}]"
                self._record(_K_AUTOGRAD_GRAD, name, g, call=self._next_call("autograd_grad", name))
        elif not self.optimizer_seen and _K_GRAD in self.kinds:
            # No optimizer: the update uses .grad as the step's last backward left it.
            self._capture_grads(self.params)

    def _capture_grads(
        self, params: list[tuple[str, torch.Tensor]], closure: bool = False
    ) -> list[torch.Tensor]:
        """``.grad`` as the update will use it: call 0, or one call per closure evaluation.
        Returns the parameters without a gradient (the update skips them)."""
        missing: list[torch.Tensor] = []
        with self._lock, self._device_batch.group():
            for name, p in params:
                if p.grad is not None:
                    call = self._next_call("closure_grad", name) if closure else 0
                    for piece_name, g in self._pieces(name, p, p.grad, keep_empty=False):
                        self._pending_grads[(piece_name, call)] = self._capture(
                            _K_GRAD, piece_name, g, call=call, seq=0, flags=0
                        )
                else:
                    missing.append(p)
        return missing

    def _pieces(
        self, name: str, p: torch.Tensor, t: torch.Tensor, *, keep_empty: bool
    ) -> list[tuple[str, torch.Tensor]]:
        """``t`` (a parameter or its .grad) as recorded: an FSDP1 FlatParameter's shard cut into
        its original parameters (views; a gradient has no piece where the rank holds none),
        anything else as it is."""
        flat = self._flat_pieces.get(id(p))
        split = flat.split(t) if flat is not None else None
        if split is None:
            return [(name, t)]
        return [(n, v) for n, v in split if keep_empty or v.numel()]

    def _owned(self, optimizer: Any) -> list[tuple[str, torch.Tensor]]:
        """The traced parameters ``optimizer`` updates (cached per optimizer)."""
        key = id(optimizer)
        owned = self._optimizer_params.get(key)
        if owned is None:
            owned = [
                self._param_by_id[id(p)]
                for p in optimizer_params(optimizer)
                if id(p) in self._param_by_id and self._param_by_id[id(p)][1] is p
            ]
            self._optimizer_params[key] = owned
        return owned

    @_guarded
    def on_optimizer_step(self, optimizer: Any) -> None:
        if self.forward_only:
            return
        owned = self._owned(optimizer)
        if not owned:
            return  # an optimizer of another model
        self.optimizer_seen = True
        if self._watch_settings(optimizer):
            owned = self._refresh_owned(optimizer)
        if not self.clock.started:
            return  # nothing recorded since the last boundary (e.g. a GradScaler retry)
        if _K_GRAD in self.kinds:
            missing = self._capture_grads(owned)
        else:
            missing = [p for _, p in owned if p.grad is None]
        if missing and self._settings is not None:
            self._settings.skipped(optimizer, missing)  # their state counts may lag from now
        if self.clock.optimizer_step():
            self._end_step()

    def _refresh_owned(self, optimizer: Any) -> list[tuple[str, torch.Tensor]]:
        """A param group's membership changed (``add_param_group``, a parameter replaced in a
        group): from this update on, the gradients of the parameters it holds now are recorded
        too (those it held before stay recorded: a record does not vanish mid-run)."""
        old = self._optimizer_params.pop(id(optimizer), None) or []
        owned = self._owned(optimizer)
        now = {id(p) for _, p in owned}
        owned.extend(item for item in old if id(item[1]) not in now)
        return owned

    def _watch_settings(self, optimizer: Any) -> bool:
        """The optimizer's settings for this step's update; a failure here stops only this.
        True when a param group's membership changed since the last step."""
        if self._settings is None:
            return False
        try:
            return self._settings.observe(optimizer, self.clock.step)
        except Exception as exc:
            self._settings = None
            warn_user(
                f"graddiff: optimizer settings are not recorded from step {self.clock.step} "
                f"({type(exc).__name__}: {exc}); the rest of the trace is unaffected"
            )
            return False

    @_guarded
    def on_closure_step(self, optimizer: Any) -> bool:
        """``optimizer.step(closure)`` begins; True asks for the closure to be wrapped."""
        if self.forward_only or not self._owned(optimizer):
            return False
        self.optimizer_seen = True
        if self._watch_settings(optimizer):
            self._refresh_owned(optimizer)
        self.clock.closure_step()
        self._closure_steps.add(id(optimizer))
        return True

    @_guarded
    def after_closure(self, optimizer: Any) -> None:
        """The closure's forward and backward have run: ``.grad`` is what the update uses."""
        self._ensure_started()
        if _K_GRAD in self.kinds:
            self._capture_grads(self._owned(optimizer), closure=True)

    @_guarded
    def on_closure_step_end(self, optimizer: Any) -> None:
        if id(optimizer) not in self._closure_steps:
            return  # a closure step graddiff did not wrap
        self._closure_steps.discard(id(optimizer))
        if self.clock.started and self.clock.optimizer_step():
            self._end_step()

    @_guarded
    def explicit_step(self) -> None:
        if self.forward_only:
            return  # every model call already is a step
        if self.clock.explicit_step():
            self._end_step()

    # -- framework integrations ---------------------------------------------------------------
    @_guarded
    def name_step(self, index: int) -> None:
        """Number the step about to begin ``index`` (a framework's own step counter). Ignored
        once the step has begun, or when it would not increase (steps stay increasing)."""
        if not self.clock.started and int(index) >= self.clock.step:
            self.clock.step = int(index)

    @_guarded
    def offer_batch(self, batch: Any) -> None:
        """A framework's training batch of the current step. Recorded at the step's end as
        ``input batch:<path>`` (one call per micro-batch), only if the model's own forward
        did not run (e.g. ``training_step`` calls submodules): its inputs are the record then."""
        self._batches.append(batch)

    def _record_offered_batches(self) -> None:
        if not self._batches or self._forward_ran or _K_INPUT not in self.kinds:
            return
        for batch in self._batches:
            for path, t in flatten_tensors(batch):
                name = record_name("batch", path)
                self._record(_K_INPUT, name, t, call=self._next_call("input", name))

    # -- lifecycle ---------------------------------------------------------------------------
    def finish(self, completed: bool) -> None:
        """Close the last step (only if the body completed) and stop recording."""
        if self.active and completed:
            try:
                self._end_step()
            except Exception as exc:
                self.fail(f"internal error at trace exit: {exc}")
        self.active = False
        self._settings_hooks.close()
        for handle in self._old_tensor_handles + self._tensor_handles:
            handle.remove()
        self._old_tensor_handles, self._tensor_handles = [], []
        self._reset_step_state()
        self._arenas.clear()

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            self.active = False
            self.writer.set_attr("status", f"stopped: {why}")
            warn_user(
                f"graddiff: recording stopped at step {self.clock.step}: {why}; training is "
                f"unaffected and the trace keeps the steps before it"
            )
