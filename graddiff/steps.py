"""When does a training step end? A pure state machine over hook events (no torch, no I/O).

The rules (README, "The step model"):
- once an optimizer that owns traced parameters steps, every ``optimizer.step()`` ends a step,
  so gradient accumulation over micro-batches is one step; ``optimizer.step(closure)`` ends
  the step after the update, once its closure (forward and backward inside) has run;
- otherwise (manual loops), a forward with grad enabled that follows a gradient computation
  starts a new step, provided the parameters changed since the step began (so gradient
  accumulation without an optimizer, or before the optimizer's first step, stays one step);
- forwards under ``torch.no_grad()`` never start a step;
- once the user calls ``tracer.step()``, only those calls end steps;
- under ``trace(forward_only=True)`` the recorder bypasses this clock's boundary rules: each
  call of the model is one step, with or without grad.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable


class StepMode(str, Enum):
    MANUAL_LOOP = "manual-loop"  # no optimizer seen: forward-after-gradient splits steps
    OPTIMIZER = "optimizer"  # optimizer.step() ends steps
    EXPLICIT = "explicit"  # tracer.step() ends steps


class StepClock:
    """Tracks the current step index and decides where boundaries fall."""

    def __init__(self, optimizer_known: bool = False) -> None:
        self.step = 0
        self.mode = StepMode.OPTIMIZER if optimizer_known else StepMode.MANUAL_LOOP
        self.gradient_seen = False  # a gradient computation happened in the current step
        self.started = False  # the current step has begun (its params were captured)

    def forward(self, grad_enabled: bool, params_changed: Callable[[], bool]) -> bool:
        """A model forward begins. Returns True if the current step must end first.

        ``params_changed`` is asked only when it matters (manual loop, after a gradient).
        """
        if not grad_enabled:
            return False
        return self.mode is StepMode.MANUAL_LOOP and self.gradient_seen and params_changed()

    def gradient(self) -> None:
        self.gradient_seen = True

    def optimizer_step(self) -> bool:
        """An optimizer owning traced parameters steps. Returns True if that ends the step."""
        if self.mode is StepMode.MANUAL_LOOP:
            self.mode = StepMode.OPTIMIZER
        return self.mode is StepMode.OPTIMIZER

    def closure_step(self) -> None:
        """``optimizer.step(closure)`` begins: the forwards and backwards its closure runs
        (several for LBFGS) belong to the current step, which ends after the update."""
        if self.mode is StepMode.MANUAL_LOOP:
            self.mode = StepMode.OPTIMIZER

    def explicit_step(self) -> bool:
        """``tracer.step()``. Returns True if there is a started step to end.

        The first call switches to explicit mode; when an automatic boundary has just closed a
        step (nothing recorded since), that call ends nothing, so ``opt.step(); tr.step()``
        does not produce empty steps.
        """
        self.mode = StepMode.EXPLICIT
        return self.started

    def advance(self) -> None:
        """The current step was closed; the next one begins on the next record."""
        self.step += 1
        self.gradient_seen = False
        self.started = False
