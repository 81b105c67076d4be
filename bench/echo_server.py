"""Raw grpcio byte streaming (asyncio server, no protobuf): the transport ceilings.

Echo streams chunks back as they arrive (upload and download overlap). Upload then
Download move the same bytes one way at a time, as a service must that answers only after
it has received everything.

Usage: python bench/echo_server.py PORT_FILE
"""

from __future__ import annotations

import asyncio
import sys

import grpc

METHOD = "/bench.Echo/Stream"


async def echo(request_iterator, context):
    async for chunk in request_iterator:
        yield chunk


async def upload(request_iterator, context):
    total = 0
    async for chunk in request_iterator:
        total += len(chunk)
    return total.to_bytes(8, "little")


async def download(request, context):
    total = int.from_bytes(request, "little")
    chunk = bytes(min(total, 1 << 20))
    for offset in range(0, total, len(chunk)):
        yield chunk[: total - offset]


async def main(port_file: str) -> None:
    limit = 16 << 20
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(echo),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Download": grpc.unary_stream_rpc_method_handler(download),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    with open(port_file, "w") as f:
        f.write(str(port))
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
