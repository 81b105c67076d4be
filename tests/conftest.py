import pytest

from tests.servers import run_server


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
