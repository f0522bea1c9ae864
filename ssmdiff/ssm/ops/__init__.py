"""Pure functions for sequence mixing: a reference and fast implementations behind one signature."""

from .selective_scan_ref import selective_scan_ref
from .selective_scan import selective_scan

__all__ = ["selective_scan", "selective_scan_ref"]
