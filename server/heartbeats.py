"""Heartbeats: empty responses on a job's stream while it waits in the queue or computes.

A proxy in front of the server ends a response stream that is silent longer than its read
timeout (nginx's grpc_read_timeout: 300 s in deploy/nginx), and neither the server's
keepalive pings nor the client's reset that timer: a job queued or computing that long
would fail and its retry start over. An empty ComputeResponse after each `interval` seconds
of silence keeps such streams open; clients skip it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gradserve.v1 import gradserve_pb2 as pb

HEARTBEAT = pb.ComputeResponse().SerializeToString()  # b"": no field set
T = TypeVar("T")


async def awaited_with_heartbeats(
    awaitable: Awaitable[T],
    write: Callable[[bytes], Awaitable[None]],
    interval: float,
    prefix: bytes = b"",
) -> tuple[T, bytes]:
    """(what `awaitable` returned, `prefix` if it is still unsent). While it runs, each
    `interval` seconds writes `prefix` (a deferred accepted message, which must go first)
    or else a heartbeat. `interval` 0: wait silently."""
    if not interval:
        return await awaitable, prefix
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result(), prefix
            await write(prefix or HEARTBEAT)
            prefix = b""
    finally:
        task.cancel()  # no-op once done; else the stream failed or the call was cancelled
