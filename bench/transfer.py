"""A ~64 MiB job through the real server vs raw grpcio bytes-streaming echo, same run.

Both servers are separate processes on loopback. The job is one [4096, 4096, 1] MLP
(64 MiB of weights up, 64 MiB of gradients down); the echo streams the same number of
bytes up and back in 1 MiB chunks. Transfer time of the job = client wall time minus the
server's reported queue + compute time.
Usage: python bench/transfer.py [--repeats R] [--stream-window-bytes W1,W2,...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc
import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import write_table  # noqa: E402
from gradserve.client import GradientClient  # noqa: E402

CHUNK = 1 << 20


@contextlib.contextmanager
def gradserve_server(*flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A `python -m gradserve.server` process on a free loopback port, with `flags`:
    (process, address) while the block runs, terminated after it."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port")
        cmd = [sys.executable, "-m", "gradserve.server", "--port", "0", "--port-file", port_file]
        server, address = start([*cmd, *flags], port_file)
        try:
            yield server, address
        finally:
            server.terminate()
            server.wait()


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


def server_command(tmp: str, name: str, window: int) -> list[str]:
    flags = ["--stream-window-bytes", str(window)] if window else []
    return [sys.executable, "-m", "gradserve.server", "--port", "0", "--port-file",
            f"{tmp}/{name}", "--log-level", "WARNING", *flags]  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--stream-window-bytes",
        type=lambda text: [int(w) for w in text.split(",")],
        default=[],
        help="comma-separated fixed stream windows: one more server each, measured in turn "
        "with the default one in every repeat",
    )
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

    windows = [0, *args.stream_window_bytes]  # 0: gRPC's adaptive window, the default
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            addresses = []
            for i, window in enumerate(windows):
                proc, address = start(server_command(tmp, f"gs{i}", window), f"{tmp}/gs{i}")
                procs.append(proc)
                addresses.append(address)
            echo, echo_addr = start(
                [
                    sys.executable,
                    os.path.join(os.path.dirname(__file__), "echo_server.py"),
                    f"{tmp}/echo",
                ],
                f"{tmp}/echo",
            )
            procs.append(echo)
            service = {w: [] for w in windows}
            wall = {w: [] for w in windows}
            echo_t, one_way = [], []
            clients = [GradientClient(a, timeout=300) for a in addresses]
            for client in clients:
                client.compute(params, x, y)  # warm-up
            for _ in range(args.repeats):
                for window, client in zip(windows, clients, strict=True):
                    start_t = time.perf_counter()
                    r = client.compute(params, x, y)
                    elapsed = time.perf_counter() - start_t
                    s = r.summary
                    moved = s["bytes_received"] + s["bytes_sent"]
                    transfer = elapsed - s["queue_seconds"] - s["compute_seconds"]
                    service[window].append(moved / transfer)
                    wall[window].append(moved / elapsed)
                up = s["bytes_received"]
                echo_t.append(2 * (up // CHUNK) * CHUNK / echo_seconds(echo_addr, up))
                down = s["bytes_sent"]
                one_way_bytes = (up // CHUNK) * CHUNK + down
                one_way.append(one_way_bytes / one_way_seconds(echo_addr, up, down))
            for client in clients:
                client.close()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()

    gb = 1e9

    def median(values: list[float]) -> float:
        return statistics.median(values) / gb

    def spread(values: list[float]) -> str:
        """Range of the per-repeat ratio to the echo measured next to it."""
        ratios = [v / e for v, e in zip(values, echo_t, strict=True)]
        return f"{min(ratios):.2f}-{max(ratios):.2f}"

    raw, seq = median(echo_t), median(one_way)
    rows = [
        ["raw grpcio bytes echo, 1 MiB chunks", f"{raw:.3f}", "1.00", ""],
        ["raw grpcio upload stream, then download stream", f"{seq:.3f}", f"{seq / raw:.2f}",
         spread(one_way)],
    ]  # fmt: skip
    for window in windows:
        named = f", --stream-window-bytes {window}" if window else ""
        for what, values in (("transfer only", service[window]), ("end to end", wall[window])):
            rows.append([f"gradserve compute, {what}{named}", f"{median(values):.3f}",
                         f"{median(values) / raw:.2f}", spread(values)])  # fmt: skip
    command = f"`python bench/transfer.py --repeats {args.repeats}" + (
        f" --stream-window-bytes {','.join(map(str, args.stream_window_bytes))}`"
        if args.stream_window_bytes
        else "`"
    )
    write_table(
        "transfer.md",
        "Transfer: ~64 MiB job through gradserve vs raw grpcio byte-streaming echo (CPU)",
        ["path", "GB/s (up + down, median)", "vs raw echo", "per repeat"],
        rows,
        "The echo overlaps upload and download; a gradient job cannot (its results need all "
        "of its inputs), so the one-way row is the ceiling for a service that answers after "
        f"receiving. Job: [4096, 4096, 1], M=1, N=8: {s['bytes_received']} bytes up, "
        f"{s['bytes_sent']} down, {args.repeats} repeats (each server's job in turn, then "
        "the echoes). 'Transfer only' subtracts the server's reported queue + compute "
        "seconds from the client's wall time. 'Per repeat': range of each repeat's ratio to "
        "the echo run right after it. Rows naming a stream window: a server started with "
        "that fixed window (loopback has a tiny round trip; a window caps one stream at "
        f"about the window per round trip on a real network). Command: {command}.",
    )


if __name__ == "__main__":
    main()
