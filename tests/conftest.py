import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Two cores shared by the whole suite: keep intra-op threads modest and results reproducible.
torch.set_num_threads(int(os.environ.get("SSMDIFF_TEST_THREADS", "2")))
# The CLI's heavy commands tune glibc's malloc for the whole process (ssmdiff.utils.alloc); tests call them
# in-process, and in-process memory measurements (tests/test_bench.py) need resident memory to follow live memory.
# tests/test_alloc.py checks the tuning itself in fresh processes.
os.environ["SSMDIFF_MALLOC"] = "default"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def benchmark_module():
    """A loader of the scripts in benchmarks/ as modules (the folder is not a package): benchmark_module("scan")."""
    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
