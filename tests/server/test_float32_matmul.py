"""--float32-matmul: how a server's Triton engine multiplies float32 jobs, here "gluon"
(kernels/gluon_fused.py and gluon_matmul.py) against the float64 oracle through a real
server and client, and against a default ("ieee") server's results."""

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import triton  # noqa: E402

from tests.jobs import random_job  # noqa: E402
from tests.server.test_parity_through_server import check  # noqa: E402
from tests.servers import run_server  # noqa: E402

# A fused job (widths up to 64) and a per-layer one (a layer wider than 128).
NETWORKS = [(37, 5, 60, 3), (5, 150, 3)]


def test_a_gluon_server_matches_the_oracle_and_differs_from_ieee_in_its_last_bits():
    """Both servers give the oracle's gradients; the Gluon kernels add the same products in
    another order, so some float32 results differ in their last bits: the flag took (and
    GetServerInfo says so)."""
    from gradserve.client import GradientClient

    results = {}
    for method in ("gluon", "ieee"):
        with run_server("--float32-matmul", method) as server:
            assert f"float32_matmul={method}" in "".join(server.log)
            # and which libraries its engines compute with
            assert f"engines=torch {torch.__version__}, triton {triton.__version__} " in "".join(
                server.log
            )
            with GradientClient(server.address, timeout=120) as client:
                engines = {e.name: e for e in client.server_info().engines}
                assert engines["triton"].float32_matmul == method
                assert engines["torch"].float32_matmul == ""  # torch's float32 is IEEE
                for sizes in NETWORKS:
                    tensors = random_job(sizes, 2, 37, sample_weights=True, seed=len(sizes))
                    result = check(client, sizes, tensors, hidden_activation="gelu",
                                   backend="triton")  # fmt: skip
                    results[method, sizes] = result.tensors
    for sizes in NETWORKS:
        gluon, ieee = results["gluon", sizes], results["ieee", sizes]
        assert any((gluon[name] != ieee[name]).any() for name in gluon), sizes
