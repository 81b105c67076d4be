"""Builds and runs the gRPC server; drains on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc
import torch

from gradserve import kernels
from gradserve.kernels import triton_engine
from gradserve.server.config import ServerConfig
from gradserve.server.memory import keep_freed_memory
from gradserve.server.ops import Health, enable_reflection
from gradserve.server.security import BearerTokenAuth, load_token, server_credentials
from gradserve.server.service import GradientService, handlers

log = logging.getLogger("gradserve.server")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
    return device


def host_port(host: str, port: int) -> str:
    """HOST:PORT, an IPv6 host in brackets ([::1]:50051): gRPC reads "::1:50051" as
    another address."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def serve(config: ServerConfig) -> None:
    device = resolve_device(config.device)
    keep_freed_memory(config.heap_ceiling_bytes)
    token = load_token(config)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # gRPC binds with SO_REUSEPORT by default: a second server started on a port in use
        # would share it silently, the kernel dealing connections between the two.
        ("grpc.so_reuseport", 0),
        # Clients ping during calls to notice a server that stopped answering (a hung or
        # unplugged host); a job computing or queued sends nothing for a while, and gRPC's
        # default would count such pings as abuse (more often than every 5 minutes) and
        # close the connection, failing the job. One a second is no load.
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        # ...and the server pings clients, so the jobs of one that vanished end (and free
        # their memory) within about a minute and a half rather than TCP's hours.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.ping_timeout_ms", 20_000),  # else 60 s, whatever the keepalive timeout
    ]
    if config.max_connection_age_s > 0:
        # Past its age a connection takes no new streams (its client reconnects for the next
        # job, re-resolving the address), but jobs in progress on it run to their end: a
        # grace period would cut a long job (training) off at every attempt, as its retries
        # start again from the beginning on a connection just as old at the same point.
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", 2**31 - 1),  # gRPC's "unlimited"
        ]
    if config.stream_window_bytes:
        # A fixed window: without BDP probing gRPC keeps each stream's window at the
        # lookahead (probing widens it whenever pings come back slower than data flows).
        options += [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", config.stream_window_bytes),
        ]
    server = grpc.aio.server(
        interceptors=[BearerTokenAuth(token)] if token else None, options=options
    )
    service = GradientService(config, device)
    server.add_generic_rpc_handlers((handlers(service),))
    health = Health(server)
    enable_reflection(server)
    credentials = server_credentials(config)
    address = host_port(config.host, config.port)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:  # grpcio raises for an address it cannot bind
        raise SystemExit(f"could not bind {address}: {e}") from None
    if port == 0:
        raise SystemExit(f"could not bind {address}")
    if config.metrics_port >= 0:  # before serving: a port in use ends the start cleanly
        try:
            metrics_port = service.metrics.serve(config.host, config.metrics_port)
        except OSError as e:
            raise SystemExit(f"--metrics-port {config.metrics_port}: {e}") from None
        if metrics_port is not None:
            log.info("metrics on http://%s/metrics", host_port(config.host, metrics_port))
    await service.start()  # engines warm before the port accepts a job
    await server.start()
    await health.set_serving(True)
    log.info(
        "serving on %s device=%s engines=%s tls=%s auth=%s float32_matmul=%s stream_window=%s",
        host_port(config.host, port),
        device,
        ", ".join(kernels.engine_library(name) for name in kernels.available_engines(device)),
        credentials is not None,
        "token" if token else "none",
        config.float32_matmul,
        config.stream_window_bytes or "adaptive",
    )
    if device.type == "cuda" and not triton_engine.available():
        log.warning("the triton engine is off (%s): the torch engine runs every job",
                    triton_engine.why_unavailable())  # fmt: skip
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
    await drain(server, service, health, config.drain_grace_s)


async def drain(server, service: GradientService, health: Health, grace_s: float) -> None:
    """Graceful stop: health NOT_SERVING and new jobs UNAVAILABLE at once (load balancers
    move traffic away), admitted jobs finish within the grace period, then the server
    stops."""
    log.info("draining: %d jobs in flight", service.admission.inflight_jobs)
    service.draining = True
    await health.set_serving(False)
    try:
        await asyncio.wait_for(service.admission.wait_idle(), grace_s)
    except asyncio.TimeoutError:
        log.warning("grace period over with %d jobs in flight", service.admission.inflight_jobs)
    await server.stop(1.0)
    await service.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    from gradserve.server.config import parse_config

    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    asyncio.run(serve(config))
