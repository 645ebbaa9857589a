"""The differ: find where two recorded runs part ways (``graddiff.compare``).

Data flow: two Runs --> align --> compare_records (cells, vectorized) --> first (walk) -->
diagnose --> Report --> render / to_dict. Never imports torch.
"""

from __future__ import annotations

from .api import DEFAULT_RTOL, compare
from .diagnose import Cause
from .report import Difference, Report

__all__ = ["DEFAULT_RTOL", "Cause", "Difference", "Report", "compare"]
