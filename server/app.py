"""Builds and runs the gRPC server; drains on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc
import torch

from gradserve.server.config import ServerConfig
from gradserve.server.service import GradientService, handlers

log = logging.getLogger("gradserve.server")

# Seconds in-flight jobs get to finish after SIGTERM before the server stops anyway.
SHUTDOWN_GRACE_S = 30.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available")
    return device


async def serve(config: ServerConfig) -> None:
    device = resolve_device(config.device)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
    )
    service = GradientService(config, device)
    server.add_generic_rpc_handlers((handlers(service),))
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise SystemExit(f"could not bind {config.host}:{config.port}")
    await server.start()
    service.start()
    log.info("serving on %s:%d device=%s", config.host, port, device)
    if config.port_file:
        with open(config.port_file + ".tmp", "w") as f:
            f.write(str(port))
        # Rename so a reader never sees a half-written file.
        os.replace(config.port_file + ".tmp", config.port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: %d jobs in flight", service.admission.inflight_jobs)
    await server.stop(SHUTDOWN_GRACE_S)
    await service.stop()


def main(argv: list[str] | None = None) -> None:
    from gradserve.server.config import parse_config

    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    asyncio.run(serve(config))
