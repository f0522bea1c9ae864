"""State-space sequence mixing: selective-scan ops and the mixer modules built on them."""

from .ops import selective_scan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref"]
