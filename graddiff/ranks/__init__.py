"""The ranks of one distributed run, read together (never imports torch).

- :func:`check_ranks` (``graddiff ranks``): do the ranks hold the same replicated state?
- :func:`open_ranks`: open and validate every rank's file of one run.
"""

from __future__ import annotations

from .files import RankSet, expand, open_ranks
from .report import RanksReport, check_ranks

__all__ = ["RankSet", "RanksReport", "check_ranks", "expand", "open_ranks"]
