"""``GraddiffCallback`` for the Hugging Face ``transformers.Trainer``
(``pip install graddiff[transformers]``).

Traces the model during ``Trainer.train()``. Steps are the Trainer's optimizer steps, named by
``state.global_step``: with ``gradient_accumulation_steps=k`` one step holds k micro-batches
(``input`` and ``loss`` calls 0..k-1); ``.grad`` is recorded right before ``optimizer.step()``,
after clipping. Inputs are the keyword arguments the Trainer passes to ``model(**inputs)``,
including ``num_items_in_batch`` when the model accepts it; evaluation runs without grad and
is not recorded.
"""

from __future__ import annotations

import os
from typing import Any, Union

from ._session import TraceSession, parse_version

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "graddiff.integrations.transformers needs transformers: "
        "pip install 'graddiff[transformers]'"
    ) from exc

#: Oldest transformers whose Trainer calls on_step_begin/on_step_end once per optimizer step.
MIN_VERSION = (4, 30)


class GraddiffCallback(TrainerCallback):
    """Record ``trainer.train()`` into ``path``; ``trace_options`` as for ``graddiff.trace``.

    Example:
        ``Trainer(model, args, train_dataset=ds, callbacks=[GraddiffCallback("runs/a.h5")])``
    """

    def __init__(self, path: Union[str, os.PathLike], **trace_options: Any) -> None:
        self._session = TraceSession("transformers", path, trace_options)
        version = getattr(transformers, "__version__", "0")
        if parse_version(version) < MIN_VERSION:
            self._session.disable(
                f"transformers {version} is older than {'.'.join(map(str, MIN_VERSION))}, whose "
                "Trainer callbacks GraddiffCallback uses"
            )

    @property
    def tracer(self) -> Any:
        """The running ``graddiff.Tracer`` (None outside ``train()`` or when not tracing)."""
        return self._session.tracer

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        self._session.start(model)
        self._session.name_step(int(state.global_step))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any):
        self._session.name_step(int(state.global_step))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self._session.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self._session.end()


__all__ = ["GraddiffCallback"]
