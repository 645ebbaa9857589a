"""One ``graddiff.trace`` owned by a framework callback: started and ended by the framework's
events, and never raising into the trainer (a problem is one warning; training goes on
untraced)."""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Union

from torch import nn

from .._warn import warn_user
from ..errors import GraddiffError
from ..tracer import Tracer


def parse_version(text: str) -> tuple[int, ...]:
    """``"2.6.0rc1"`` -> ``(2, 6, 0)``: the leading numeric parts."""
    out = []
    for part in str(text).split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        out.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(out)


class TraceSession:
    """The trace of one training run, for a callback of ``framework``."""

    def __init__(self, framework: str, path: Union[str, os.PathLike], options: dict) -> None:
        self.framework = framework
        self.path = path
        self.options = options
        self.tracer: Optional[Tracer] = None
        self.disabled: Optional[str] = None  # why this callback records nothing
        # Bad options are the user's mistake at construction time, before training starts.
        Tracer(nn.Module(), path, **options)

    def disable(self, why: str) -> None:
        self.disabled = why
        warn_user(f"graddiff: {self.framework} training is not traced: {why}")

    def start(self, model: Any) -> None:
        """Begin tracing ``model``; on any problem warn once and leave training untraced."""
        if self.tracer is not None:
            self.end(error=RuntimeError("a new run started before the previous one ended"))
        if self.disabled is not None:
            return
        if not isinstance(model, nn.Module):
            warn_user(
                f"graddiff: {self.framework} training is not traced: the model is a "
                f"{type(model).__name__}, not a torch.nn.Module"
            )
            return
        try:
            tracer = Tracer(model, self.path, **self.options)
            tracer.__enter__()
        except GraddiffError as exc:
            warn_user(f"graddiff: {self.framework} training is not traced: {exc}")
            return
        except Exception as exc:  # never into the trainer
            warn_user(
                f"graddiff: {self.framework} training is not traced: could not start the "
                f"trace ({type(exc).__name__}: {exc})"
            )
            return
        self.tracer = tracer

    def name_step(self, index: int) -> None:
        if self.tracer is not None:
            self.tracer.name_step(index)

    def offer_batch(self, batch: Any) -> None:
        if self.tracer is not None:
            self.tracer.offer_batch(batch)

    def step(self) -> None:
        """End the current step at the framework's optimizer-step boundary."""
        if self.tracer is None:
            return
        try:
            self.tracer.step()
        except Exception as exc:
            self._abandon(f"ending a step failed ({type(exc).__name__}: {exc})")

    def end(self, error: Optional[BaseException] = None) -> None:
        """Close the trace: complete, or aborted by ``error``. Idempotent."""
        tracer, self.tracer = self.tracer, None
        if tracer is None:
            return
        try:
            if error is None:
                tracer.__exit__(None, None, None)
            else:
                tracer.__exit__(type(error), error, error.__traceback__)
        except Exception as exc:
            warn_user(
                f"graddiff: closing the {self.framework} trace {self.path} failed "
                f"({type(exc).__name__}: {exc})"
            )

    def _abandon(self, why: str) -> None:
        warn_user(f"graddiff: {self.framework} tracing stopped: {why}; training continues")
        self.end(error=RuntimeError(why))
