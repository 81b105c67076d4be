"""Raw grpcio peer of `gradserve-client bench`: C concurrent callers, each on its own
channel, making J bidirectional-stream calls of one message of B bytes each way against
bench/echo_server.py. What a job costs in gRPC alone, with no service behind it.

Usage: python bench/echo_load.py ADDRESS CONCURRENCY CALLS_PER_CALLER BYTES  (prints JSON)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import grpc


async def main(address: str, concurrency: int, calls: int, nbytes: int) -> None:
    payload = os.urandom(nbytes)
    latencies: list[float] = []

    async def caller(n: int) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = channel.stream_stream("/bench.Echo/Stream")
            for _ in range(n):
                start = time.perf_counter()
                replies = [reply async for reply in stream(iter([payload]))]
                assert len(replies) == 1 and len(replies[0]) == nbytes
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(caller(2) for _ in range(concurrency)))  # warm-up
    latencies.clear()
    start = time.perf_counter()
    await asyncio.gather(*(caller(calls) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    latencies.sort()
    print(json.dumps({
        "calls": len(latencies),
        "calls_per_second": round(len(latencies) / seconds, 2),
        "p50_ms": round(1e3 * latencies[len(latencies) // 2], 3),
        "p99_ms": round(1e3 * latencies[int(len(latencies) * 0.99)], 3),
    }))  # fmt: skip


if __name__ == "__main__":
    address, concurrency, calls, nbytes = sys.argv[1], *map(int, sys.argv[2:5])
    asyncio.run(main(address, concurrency, calls, nbytes))
