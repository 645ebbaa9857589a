"""``GraddiffCallback`` for PyTorch Lightning (``pip install graddiff[lightning]``).

Traces the LightningModule during ``Trainer.fit``. Steps are Lightning's optimizer steps,
named by ``trainer.global_step``: with ``accumulate_grad_batches=k`` one step holds k
micro-batches; ``.grad`` is recorded after the closure Lightning passes to
``optimizer.step(closure)`` has run (after clipping and AMP unscaling), as the update uses it.
Validation and sanity-check forwards run without grad and are not recorded.
"""

from __future__ import annotations

import os
from typing import Any, Union

from .._warn import warn_user
from ._session import TraceSession, parse_version

try:
    import lightning
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "graddiff.integrations.lightning needs Lightning 2.x (the `lightning` package): "
        "pip install 'graddiff[lightning]'"
    ) from exc

#: Oldest Lightning whose Trainer calls these hooks with these signatures.
MIN_VERSION = (2, 0)


class GraddiffCallback(Callback):
    """Record ``trainer.fit(model)`` into ``path``; ``trace_options`` as for ``graddiff.trace``.

    Example:
        ``trainer = L.Trainer(callbacks=[GraddiffCallback("runs/a.h5")])``
    """

    def __init__(self, path: Union[str, os.PathLike], **trace_options: Any) -> None:
        super().__init__()
        self._session = TraceSession("Lightning", path, trace_options)
        self._global_step = -1
        version = getattr(lightning, "__version__", "0")
        if parse_version(version) < MIN_VERSION:
            self._session.disable(
                f"Lightning {version} is older than {'.'.join(map(str, MIN_VERSION))}, whose "
                "callback hooks GraddiffCallback uses"
            )

    @property
    def tracer(self) -> Any:
        """The running ``graddiff.Tracer`` (None outside ``fit`` or when not tracing)."""
        return self._session.tracer

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._global_step = int(trainer.global_step)
        self._session.start(pl_module)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._session.name_step(int(trainer.global_step))
        self._session.offer_batch(batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning's step boundary: the global step advanced (one or more optimizer steps,
        # also when a GradScaler skipped the update and no optimizer hook fired).
        if int(trainer.global_step) != self._global_step:
            self._global_step = int(trainer.global_step)
            self._session.step()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._session.end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._session.end(error=exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._session.tracer is not None:  # fit ended without on_fit_end
            warn_user("graddiff: Lightning fit ended early; the trace keeps its complete steps")
            self._session.end(error=RuntimeError("fit ended early"))


__all__ = ["GraddiffCallback"]
