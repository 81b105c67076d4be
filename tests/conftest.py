import os

import pytest
import torch

# Without a GPU, Triton kernels run on Triton's CPU interpreter. It is chosen when kernels
# are defined, so this must happen before any test imports gradserve.kernels' Triton code.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.servers import run_server  # noqa: E402


@pytest.fixture(scope="session")
def server():
    """One real server for the tests that only need a healthy default server."""
    with run_server() as running:
        yield running


@pytest.fixture(scope="session")
def client(server):
    from gradserve.client import GradientClient

    with GradientClient(server.address, timeout=120) as c:
        yield c


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
