"""Autograd helpers shared by the scan paths."""

from __future__ import annotations

import torch


def needs_grad(*tensors) -> bool:
    """Whether a result computed from ``tensors`` (None entries ignored) will be differentiated: grad mode is on and
    one of them requires grad. Decided before an autograd Function's forward, inside which grad mode is off: the
    scans keep their saved states (or take a path with a backward) only then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
