"""ssmdiff.utils.alloc: the CPU allocator tuning the CLI applies to its heavy commands, checked in fresh processes
(the settings are process-wide; the test session itself runs with SSMDIFF_MALLOC=default, see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import ctypes, resource
from ssmdiff.utils import alloc
tuned = alloc.tune_cpu_allocator()
print(alloc.cpu_allocator_state())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 64 * 2**20  # twice glibc's largest default mmap threshold


def touch():
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    libc.free(p)


touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
# Page faults of a second buffer of the same size: about n / 4096 when it is a fresh mapping, ~0 when the freed
# pages stayed in the heap.
print("reused" if resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < n // 4096 // 10 else "faulted")
"""


def _probe(prefix: str = "", **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("SSMDIFF_MALLOC", "MALLOC_MMAP_THRESHOLD_",
                                                              "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    env.update(env_changes)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", prefix + PROBE], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")


@glibc_only
def test_tuning_keeps_large_buffers_in_the_heap():
    assert _probe() == ["tuned", "reused"]


@glibc_only
@pytest.mark.parametrize("env,why", [({"SSMDIFF_MALLOC": "default"}, "SSMDIFF_MALLOC=default"),
                                     ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_ is set")])
def test_tuning_stays_off_where_the_user_chose(env, why):
    assert _probe(**env) == [f"default ({why})", "faulted"]


@glibc_only
def test_tuning_stays_off_under_a_preloaded_allocator():
    # Only the environment variable is set (inside the probe, after start-up): nothing is actually preloaded.
    prefix = "import os; os.environ['LD_PRELOAD'] = '/opt/lib/libjemalloc.so.2'\n"
    assert _probe(prefix) == ["default (jemalloc is preloaded)", "faulted"]


def test_cli_tunes_only_its_heavy_commands():
    from ssmdiff import cli

    assert set(cli._HEAVY_COMMANDS) <= set(cli.COMMANDS)
    assert "models" not in cli._HEAVY_COMMANDS and "export" not in cli._HEAVY_COMMANDS
