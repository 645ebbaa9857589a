"""Post-mortem debugging of one trace (or of a comparison): checks, summaries, plots, HTML.

Data flow: ``graddiff.open`` --Run--> series --> findings / summary / plots --> CLI commands
``show``, ``inspect``, ``check``, ``plot``, ``shell``; a ``graddiff.diff.Report`` --> plots, html.
Everything here reads only: no torch, and matplotlib only inside the plotting functions.
"""

from __future__ import annotations

from .findings import CheckReport, Finding, check_run
from .summary import summarize

__all__ = ["CheckReport", "Finding", "check_run", "summarize"]
