"""Process-wide CPU allocator settings for ssmdiff's heavy commands (train, sample, evaluate, the benchmark).

PyTorch's CPU tensors come from the C library's malloc. glibc serves a request above its mmap threshold (at most
32 MiB by default, adjusted as memory is freed) with a fresh ``mmap`` and unmaps it on free, so every such tensor is
page-faulted in again on its next allocation; memory freed at the top of the heap beyond the trim threshold is
returned to the system the same way. A training step allocates and frees the same large activations every time,
and on this project's 2-core VM a fresh 40 MB buffer took 14 ms to allocate and fill against 1.2 ms for a reused
one (``python -m ssmdiff.utils.alloc``). PyTorch's CPU performance guides recommend preloading jemalloc or
tcmalloc for this reason; ``tune_cpu_allocator`` gets the same effect from glibc: a 1 GiB mmap threshold and no
trimming, so freed buffers stay in the heap and are reused. The cost is that resident memory stays at the step's
peak instead of falling between steps.

Never applied on import: the CLI calls it for its heavy commands (and the benchmark in each measuring process),
library users may call it themselves. ``SSMDIFF_MALLOC=default`` turns it off; it also stays off when the user chose
the allocator's behaviour already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` set,
or jemalloc/tcmalloc/mimalloc preloaded), and where there is no glibc ``mallopt`` (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_cpu_allocator", "cpu_allocator_state", "MMAP_THRESHOLD_BYTES"]

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30
_TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # mallopt takes an int
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

_state = "default"


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def mallopt(param: int, value: int) -> bool:
    """glibc ``mallopt(param, value)``; False where there is no glibc or it refused the value."""
    libc = _libc()
    if libc is None:
        return False
    try:
        return libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
    except (OSError, AttributeError):
        return False


def _reason_to_skip() -> str | None:
    if os.environ.get("SSMDIFF_MALLOC", "").strip().lower() == "default":
        return "SSMDIFF_MALLOC=default"
    for name in _USER_SETTINGS:
        if os.environ.get(name):
            return f"{name} is set"
    preload = os.environ.get("LD_PRELOAD", "").lower()
    for lib in _PRELOADED:
        if lib in preload:
            return f"{lib} is preloaded"
    return None


def tune_cpu_allocator() -> bool:
    """Keep large freed CPU buffers in the heap for reuse (see the module docstring). Returns whether the settings
    are in effect; calling it again is harmless."""
    global _state
    if _state == "tuned":
        return True
    reason = _reason_to_skip()
    if reason is not None:
        _state = f"default ({reason})"
        return False
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES):
        _state = "tuned"
        return True
    _state = "default (no glibc mallopt)"
    return False


def cpu_allocator_state() -> str:
    """'tuned', or 'default' with the reason tuning was skipped (what benchmark results record)."""
    return _state


def _demo(mb: int = 40, repeats: int = 12) -> None:
    """Times allocating and filling a fresh ``mb`` MB tensor, then reusing one, before and after tuning."""
    import time

    import torch

    n = mb * 2**20 // 4
    kept = torch.empty(n)

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    fresh = best(lambda: torch.empty(n).fill_(1.0))
    reused = best(lambda: kept.fill_(1.0))
    print(f"default allocator: fresh {mb} MB tensor {fresh:.1f} ms, reused {reused:.1f} ms")
    if not tune_cpu_allocator():
        print(f"not tuned: {cpu_allocator_state()}")
        return
    best(lambda: torch.empty(n).fill_(1.0))  # the heap grows to hold the buffer once
    tuned = best(lambda: torch.empty(n).fill_(1.0))
    print(f"tuned allocator:   fresh {mb} MB tensor {tuned:.1f} ms ({fresh / tuned:.1f}x faster)")


if __name__ == "__main__":
    _demo()
