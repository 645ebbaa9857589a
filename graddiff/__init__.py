"""graddiff: find the first step, layer and quantity where two PyTorch training runs diverge.

Record with ``graddiff.trace(model, "run.h5")``; read with ``graddiff.open``; compare with
``graddiff.compare`` or ``graddiff compare a.h5 b.h5``. Only the recording side imports torch:
``trace`` is resolved lazily so that reading and comparing stay fast and torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    GraddiffError,
    NotATwinError,
    TraceFileError,
    TraceUsageError,
    ValuesNotStoredError,
)
from .kinds import Kind
from .reader import RecordKey, Run
from .reader import open_run as open  # noqa: A001  (the public name is graddiff.open)

if TYPE_CHECKING:
    from .diff import Report, compare
    from .ranks import RanksReport, check_ranks
    from .tracer import Tracer, trace

__all__ = [
    "GraddiffError",
    "Kind",
    "NotATwinError",
    "RecordKey",
    "Report",
    "Run",
    "TraceFileError",
    "TraceUsageError",
    "Tracer",
    "RanksReport",
    "ValuesNotStoredError",
    "__version__",
    "check_ranks",
    "compare",
    "open",
    "trace",
]

_LAZY = {
    "trace": ("tracer", "trace"),
    "Tracer": ("tracer", "Tracer"),
    "compare": ("diff", "compare"),
    "Report": ("diff", "Report"),
    "check_ranks": ("ranks", "check_ranks"),
    "RanksReport": ("ranks", "RanksReport"),
}


def __getattr__(name: str) -> Any:  # PEP 562: torch is imported only when tracing
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'graddiff' has no attribute {name!r}")
