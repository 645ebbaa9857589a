"""The ranks of one distributed run, read together (never imports torch).

- :func:`check_ranks` (``graddiff ranks``): do the ranks hold the same replicated state?
- :func:`open_ranks`: open and validate every rank's file of one run.

Names are resolved on first use, so that the worker processes of ``graddiff ranks``
(graddiff.ranks.worker) import only the reader, not the report and the differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .files import RankSet, expand, open_ranks
    from .report import RanksReport, check_ranks

__all__ = ["RankSet", "RanksReport", "check_ranks", "expand", "open_ranks"]

_LAZY = {
    "RankSet": "files",
    "expand": "files",
    "open_ranks": "files",
    "RanksReport": "report",
    "check_ranks": "report",
}


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'graddiff.ranks' has no attribute {name!r}")
