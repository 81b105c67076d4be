"""Real gradserve server processes on loopback ports, for tests."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc


@dataclass
class RunningServer:
    process: subprocess.Popen
    address: str
    log: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def _wait_until_serving(proc, log: list[str], ready_timeout: float, secure: bool) -> str:
    address = None
    # The server logs "serving on HOST:PORT" once bound; read up to that line.
    for line in proc.stderr:
        log.append(line)
        match = re.search(r"serving on (\S+):(\d+)", line)
        if match:
            address = f"{match[1]}:{match[2]}"
            break
    if address is None:
        proc.wait(timeout=10)
        raise RuntimeError("server did not start:\n" + "".join(log))
    if not secure:  # a TLS server's readiness is proven by the test's own first call
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=ready_timeout)
    return address


@contextlib.contextmanager
def run_server(
    *flags: str,
    env: dict | None = None,
    ready_timeout: float = 60,
    secure: bool = False,
    program: list[str] | None = None,
    cwd: str | None = None,
) -> Iterator[RunningServer]:
    """Start `python -m gradserve.server` (or `program`) on a free port; yield once it answers
    gRPC."""
    program = program or [sys.executable, "-m", "gradserve.server"]
    cmd = [*program, "--port", "0", "--log-level", "INFO", *flags]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
    log: list[str] = []
    try:
        address = _wait_until_serving(proc, log, ready_timeout, secure)
    except BaseException:  # a failed or interrupted start must not leave the server behind
        proc.kill()
        proc.wait()
        raise
    drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    drain.start()
    server = RunningServer(proc, address, log)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        drain.join(timeout=5)
