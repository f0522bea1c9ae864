"""Counting the arithmetic that matmul/conv hooks cannot see (selective scans, S4D convolutions, SSD chunks).

``torch.utils.flop_counter.FlopCounterMode`` sees aten matmuls, convolutions and attention, but not a scan done in
a compiled kernel or in a Python loop. Ops in ``ssmdiff.ssm.ops`` therefore report their own cost here while a
``count_extra_flops()`` context is open, and model flops = matmul/conv flops + these. Convention of DiT's table:
forward pass, one multiply-add counted as one flop (the scan's cost is the usual 9*B*L*D*N estimate).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

_counters: list[dict] = []


def record_flops(kind: str, flops: float) -> None:
    """Add ``flops`` under ``kind`` to every open counter (no-op when none is open)."""
    for c in _counters:
        c[kind] += float(flops)


def counting_active() -> bool:
    return bool(_counters)


@contextlib.contextmanager
def count_extra_flops():
    """Yields a dict kind -> flops, filled by ops that run inside the block."""
    counter: dict = defaultdict(float)
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)
