import os

import pytest
import torch

# Two cores shared by the whole suite: keep intra-op threads modest and results reproducible.
torch.set_num_threads(int(os.environ.get("SSMDIFF_TEST_THREADS", "2")))


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
