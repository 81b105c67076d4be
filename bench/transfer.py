"""A ~64 MiB job through the real server vs raw grpcio bytes-streaming echo, same run.

Both servers are separate processes on loopback. The job is one [4096, 4096, 1] MLP
(64 MiB of weights up, 64 MiB of gradients down); the echo streams the same number of
bytes up and back in 1 MiB chunks. Transfer time of the job = client wall time minus the
server's reported queue + compute time.
Usage: python bench/transfer.py [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import write_table  # noqa: E402
from gradserve.client import GradientClient  # noqa: E402

CHUNK = 1 << 20


def start(cmd: list[str], port_file: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{cmd} did not start")
        time.sleep(0.05)
    address = f"127.0.0.1:{open(port_file).read().strip()}"
    with grpc.insecure_channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
    return proc, address


def echo_seconds(address: str, total_bytes: int) -> float:
    payload = os.urandom(CHUNK)
    n = total_bytes // CHUNK
    with grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 16 << 20)]
    ) as ch:
        call = ch.stream_stream("/bench.Echo/Stream")
        start_t = time.perf_counter()
        got = sum(len(b) for b in call(iter([payload] * n)))
        elapsed = time.perf_counter() - start_t
    assert got == n * CHUNK
    return elapsed


def one_way_seconds(address: str, up_bytes: int, down_bytes: int) -> float:
    """Upload up_bytes, then download down_bytes, as two raw streams one after the other."""
    payload = os.urandom(CHUNK)
    with grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 16 << 20)]
    ) as ch:
        upload = ch.stream_unary("/bench.Echo/Upload")
        download = ch.unary_stream("/bench.Echo/Download")
        start_t = time.perf_counter()
        upload(iter([payload] * (up_bytes // CHUNK)))
        got = sum(len(b) for b in download(down_bytes.to_bytes(8, "little")))
        elapsed = time.perf_counter() - start_t
    assert got == down_bytes
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sizes = [4096, 4096, 1]
    params = {
        "layers.0.weight": rng.standard_normal((1, 4096, 4096), dtype=np.float32) / 64,
        "layers.0.bias": rng.standard_normal((1, 4096), dtype=np.float32),
        "layers.1.weight": rng.standard_normal((1, 1, 4096), dtype=np.float32) / 64,
        "layers.1.bias": rng.standard_normal((1, 1), dtype=np.float32),
    }
    x = rng.standard_normal((8, sizes[0]), dtype=np.float32)
    y = rng.standard_normal((8, 1), dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        server, gs_addr = start(
            [
                sys.executable,
                "-m",
                "gradserve.server",
                "--port",
                "0",
                "--port-file",
                f"{tmp}/gs",
                "--log-level",
                "WARNING",
            ],
            f"{tmp}/gs",
        )
        echo, echo_addr = start(
            [
                sys.executable,
                os.path.join(os.path.dirname(__file__), "echo_server.py"),
                f"{tmp}/echo",
            ],
            f"{tmp}/echo",
        )
        try:
            service, wall, echo_t, one_way = [], [], [], []
            with GradientClient(gs_addr, timeout=300) as client:
                client.compute(params, x, y)  # warm-up
                for _ in range(args.repeats):
                    start_t = time.perf_counter()
                    r = client.compute(params, x, y)
                    elapsed = time.perf_counter() - start_t
                    s = r.summary
                    moved = s["bytes_received"] + s["bytes_sent"]
                    transfer = elapsed - s["queue_seconds"] - s["compute_seconds"]
                    service.append(moved / transfer)
                    wall.append(moved / elapsed)
                    up = s["bytes_received"]
                    echo_t.append(2 * (up // CHUNK) * CHUNK / echo_seconds(echo_addr, up))
                    down = s["bytes_sent"]
                    one_way.append(
                        ((up // CHUNK) * CHUNK + down) / one_way_seconds(echo_addr, up, down)
                    )
        finally:
            server.terminate()
            echo.terminate()
            server.wait()
            echo.wait()

    gb = 1e9
    svc, e2e, raw, seq = (statistics.median(v) / gb for v in (service, wall, echo_t, one_way))

    def spread(values: list[float]) -> str:
        """Range of the per-repeat ratio to the echo measured next to it."""
        ratios = [v / e for v, e in zip(values, echo_t, strict=True)]
        return f"{min(ratios):.2f}-{max(ratios):.2f}"

    write_table(
        "transfer.md",
        "Transfer: ~64 MiB job through gradserve vs raw grpcio byte-streaming echo (CPU)",
        ["path", "GB/s (up + down, median)", "vs raw echo", "per repeat"],
        [
            ["raw grpcio bytes echo, 1 MiB chunks", f"{raw:.3f}", "1.00", ""],
            [
                "raw grpcio upload stream, then download stream",
                f"{seq:.3f}",
                f"{seq / raw:.2f}",
                spread(one_way),
            ],
            ["gradserve compute, transfer only", f"{svc:.3f}", f"{svc / raw:.2f}", spread(service)],
            ["gradserve compute, end to end", f"{e2e:.3f}", f"{e2e / raw:.2f}", spread(wall)],
        ],  # fmt: skip
        "The echo overlaps upload and download; a gradient job cannot (its results need all "
        "of its inputs), so the one-way row is the ceiling for a service that answers after "
        f"receiving. Job: [4096, 4096, 1], M=1, N=8: {s['bytes_received']} bytes up, "
        f"{s['bytes_sent']} down, {args.repeats} repeats. 'Transfer only' subtracts the "
        "server's reported queue + compute seconds from the client's wall time. 'Per repeat': "
        "range of each repeat's ratio to the echo run right after it. Command: "
        "`python bench/transfer.py`.",
    )


if __name__ == "__main__":
    main()
