"""Sequence mixers (nn.Modules) built on the ops in ``ssmdiff.ssm.ops``: x (batch, length, d_model) in and out
(BiS4D: out width 2 * d_model)."""

from .mamba import BiMamba, Mamba
from .mamba2 import GatedRMSNorm, Mamba2
from .s4d import BiS4D, S4DKernel

__all__ = ["Mamba", "BiMamba", "Mamba2", "GatedRMSNorm", "BiS4D", "S4DKernel"]
