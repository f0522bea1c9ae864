"""State-space sequence mixing: selective-scan ops and the mixer modules built on them."""

from .modules import BiMamba, BiS4D, Mamba, Mamba2
from .ops import selective_scan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "Mamba", "BiMamba", "Mamba2", "BiS4D"]
