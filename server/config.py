"""Server configuration: one dataclass, filled from flags, then GRADSERVE_* variables, then
defaults (a flag wins over the environment)."""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, fields

from gradserve.kernels.triton_engine import FLOAT32_MATMUL, FLOAT32_MATMULS, gluon_available
from gradserve.server.memory import HEAP_ALLOCATION_CEILING

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # Written with the bound port once listening (useful with --port 0).
    port_file: str = ""
    device: str = "auto"
    # Result chunk size: 1 MiB keeps every message far below gRPC's 4 MiB default.
    chunk_bytes: int = 1 * MiB
    max_chunk_bytes: int = 4 * MiB
    max_job_bytes: int = 2 * GiB
    # Estimated engine working memory (activations and gradients) of one job.
    max_work_bytes: int = 8 * GiB
    # Payload bytes held at once across all jobs; more is refused with RESOURCE_EXHAUSTED.
    max_inflight_bytes: int = 4 * GiB
    # Jobs admitted and not yet finished; more are refused with RESOURCE_EXHAUSTED.
    max_queued_jobs: int = 1024
    # Dynamic batching: how long the first job of a batch may wait for others while the
    # engine is idle, and the most jobs / models / payload bytes per launch.
    batch_max_delay_ms: float = 2.0
    batch_max_jobs: int = 256
    batch_max_models: int = 65536
    batch_max_bytes: int = 256 * MiB
    max_models: int = 1 << 20
    max_samples: int = 1 << 24
    max_width: int = 8192
    max_layers: int = 64
    # Most optimiser steps one job may ask for.
    max_optimizer_steps: int = 100_000
    # The least wait before a refused job's retry that the server suggests (the pushback
    # trailer); more while many refused jobs wait (admission.RetryPacer).
    retry_pushback_ms: int = 100
    # A job whose request stream is silent this long is ended with DEADLINE_EXCEEDED (not
    # counting while a streamed job's micro-batch computes: its client may wait for the
    # micro-batch's rows before it sends more).
    upload_idle_timeout_s: float = 60.0
    # A job whose upload comes slower than this many tensor bytes a second is ended with
    # DEADLINE_EXCEEDED (0: no minimum; server.timers.UploadTimer): its reads may wait, in
    # all, the idle timeout plus its bytes at this rate, so a client trickling a byte just
    # inside each idle timeout cannot hold its admitted bytes for hours. Below one job's
    # share of a 10 Mbit/s link among the 64 jobs the asyncio client keeps in flight.
    min_upload_bytes_per_s: int = 16 * KiB
    # A job whose client reads none of its result messages this long is ended with
    # DEADLINE_EXCEEDED (as nginx's send_timeout): a client that stops reading would hold
    # its job's memory, and its share of max_inflight_bytes, for as long as it stayed.
    download_idle_timeout_s: float = 60.0
    # While a job waits or computes, an empty response after this many seconds of silence
    # on its stream (0: never), so that proxies' read timeouts do not end it
    # (server.heartbeats; nginx's grpc_read_timeout is 300 s in deploy/nginx).
    heartbeat_s: float = 30.0
    # Close client connections after this many seconds (0: never), so that clients using
    # DNS round-robin (a Kubernetes headless Service) re-resolve and find new replicas.
    max_connection_age_s: float = 0.0
    # Bytes of a job's request stream gRPC may receive ahead of what the server has read
    # (0: gRPC's adaptive window, sized from the round trips it times, which on a loaded
    # host grew to tens of MiB per stream). A fixed window bounds that memory per job, and
    # caps one job's upload rate at about the window per network round trip.
    stream_window_bytes: int = 0
    # After SIGTERM/SIGINT: seconds admitted jobs get to finish before the server stops.
    drain_grace_s: float = 30.0
    # Prometheus metrics over HTTP on this port (0: a free port, -1: off).
    metrics_port: int = -1
    # TLS: certificate chain and private key (PEM); with a client CA, callers must present
    # a certificate it signed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Bearer token required in the `authorization` metadata of every call but health
    # checks; prefer the file (or the GRADSERVE_AUTH_TOKEN variable) to a flag.
    auth_token_file: str = ""
    auth_token: str = ""
    # Freed large payload buffers kept for later jobs of the same size (0: none kept);
    # saves the page faults of mapping fresh memory for each large job.
    reuse_buffer_bytes: int = 1 * GiB
    # Allocations up to this size come from the heap and are reused once freed (messages,
    # the engine's activations and gradients; server/memory.py): faster jobs on a CPU, more
    # memory held while busy. 0 leaves glibc's own policy; at most glibc's 32 MiB.
    heap_ceiling_bytes: int = HEAP_ALLOCATION_CEILING
    # Compiled Triton kernel specialisations kept in memory (kernels.compiled_kernels):
    # beyond it all are dropped, and reloaded from Triton's disk cache as jobs need them.
    max_compiled_kernels: int = 64
    # Bytes of Triton's on-disk kernel cache kept (kernels.kernel_disk_cache): pruned, least
    # recently used first, at start and whenever the compiled kernels are dropped.
    max_kernel_cache_bytes: int = 1 * GiB
    # How the Triton engine multiplies float32 jobs (kernels.triton_engine.FLOAT32_MATMULS).
    float32_matmul: str = FLOAT32_MATMUL
    log_level: str = "INFO"

    @property
    def max_message_bytes(self) -> int:
        # Room for a chunk plus its framing, or a header with many descriptors.
        return self.max_chunk_bytes + 1 * MiB


HELP = {
    "host": "address to bind",
    "port": "port to bind (0 picks a free one)",
    "port_file": "write the bound port to this file once serving",
    "device": "auto, cpu, cuda or cuda:N",
    "chunk_bytes": "default size of result chunks",
    "max_chunk_bytes": "largest accepted chunk",
    "max_job_bytes": "largest total of declared tensor bytes per job",
    "max_work_bytes": "largest estimated engine working memory per job",
    "max_inflight_bytes": "largest total of payload bytes held across jobs",
    "max_queued_jobs": "most jobs admitted at once",
    "batch_max_delay_ms": "longest wait of a batch's first job for others that could join (ms)",
    "batch_max_jobs": "most jobs in one engine launch (1 disables batching)",
    "batch_max_models": "most models in one engine launch",
    "batch_max_bytes": "most payload bytes in one engine launch",
    "max_models": "largest ensemble size M",
    "max_samples": "largest sample count N",
    "max_width": "largest layer width",
    "max_layers": "largest number of linear layers",
    "max_optimizer_steps": "most optimiser steps per job",
    "retry_pushback_ms": "least wait before a refused job's retry that the server suggests",
    "upload_idle_timeout_s": "end a job whose request stream is silent this long (seconds)",
    "min_upload_bytes_per_s": "end a job whose upload comes slower than this many tensor bytes "
    "a second: its reads may wait, in all, the idle timeout plus its bytes at this rate (0: no "
    "minimum)",
    "download_idle_timeout_s": "end a job whose client reads no result message this long (seconds)",
    "heartbeat_s": "send an empty response after this many silent seconds of a waiting or "
    "computing job, for proxies' read timeouts (0: never)",
    "max_connection_age_s": "close client connections after this many seconds (0: never)",
    "stream_window_bytes": "bytes of a job's request stream gRPC may receive ahead of the "
    "server's reads (0: gRPC's adaptive window; else a fixed one, at least 65535)",
    "drain_grace_s": "after SIGTERM, seconds admitted jobs get to finish",
    "metrics_port": "Prometheus metrics HTTP port (0: a free port, -1: off)",
    "tls_cert": "TLS certificate chain (PEM); enables TLS with --tls-key",
    "tls_key": "TLS private key (PEM)",
    "tls_client_ca": "require client certificates signed by this CA (PEM)",
    "auth_token_file": "file holding the bearer token callers must present",
    "auth_token": "bearer token callers must present (prefer the file or the variable)",
    "reuse_buffer_bytes": "freed large payload buffers kept for later jobs (0: none)",
    "heap_ceiling_bytes": "largest allocation served from the heap and reused once freed "
    f"(0: glibc's own policy; at most {HEAP_ALLOCATION_CEILING})",
    "max_compiled_kernels": "most compiled Triton kernels kept in memory (beyond: all dropped)",
    "max_kernel_cache_bytes": "bytes of Triton's on-disk kernel cache kept (least recently "
    "used removed first)",
    "float32_matmul": "how the triton engine multiplies float32 jobs: ieee (IEEE fp32 FMAs), "
    "tf32x3 (three tf32 tensor-core products, fp32 accuracy) or gluon (IEEE fp32 FMAs in "
    "Gluon kernels with 8x8 outputs a thread; not yet timed on a GPU)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def env_name(field_name: str) -> str:
    return "GRADSERVE_" + field_name.upper()


# Least value of each numeric option (anything else is a mistake that would start a server
# refusing every job, or never batching, or binding nothing).
AT_LEAST = {
    "port": 0,
    "metrics_port": -1,
    "batch_max_delay_ms": 0,
    "max_connection_age_s": 0,
    "stream_window_bytes": 0,
    "min_upload_bytes_per_s": 0,
    "drain_grace_s": 0,
    "heartbeat_s": 0,
    "reuse_buffer_bytes": 0,
    "heap_ceiling_bytes": 0,
    "max_kernel_cache_bytes": 0,
}
MAX_PORT = 65535
# HTTP/2's default window and its largest.
MIN_STREAM_WINDOW, MAX_STREAM_WINDOW = 65535, 2**31 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse option values no server can work with, naming the flag."""
    for f in fields(ServerConfig):
        value = getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{flag} must be a finite number, got {value}")
        if isinstance(value, (int, float)):
            low = AT_LEAST.get(f.name, 1)  # counts, sizes and timeouts: positive
            if value < low:
                parser.error(f"{flag} must be at least {low}, got {value}")
    for name in ("port", "metrics_port"):
        if getattr(args, name) > MAX_PORT:
            parser.error(f"--{name.replace('_', '-')} must be at most {MAX_PORT}")
    if not args.host.strip():  # gRPC would take ":PORT" and fail to bind, naming no flag
        parser.error("--host must name an address to bind (0.0.0.0 or :: for all)")
    window = args.stream_window_bytes
    if window and not MIN_STREAM_WINDOW <= window <= MAX_STREAM_WINDOW:
        parser.error(f"--stream-window-bytes must be 0 (gRPC's adaptive window) or from "
                     f"{MIN_STREAM_WINDOW} to {MAX_STREAM_WINDOW}, got {window}")  # fmt: skip
    if args.heap_ceiling_bytes > HEAP_ALLOCATION_CEILING:
        parser.error(f"--heap-ceiling-bytes must be at most {HEAP_ALLOCATION_CEILING} "
                     f"(glibc's largest), got {args.heap_ceiling_bytes}")  # fmt: skip
    if args.chunk_bytes > args.max_chunk_bytes:
        parser.error("--chunk-bytes must not exceed --max-chunk-bytes")
    if not DEVICE.match(args.device):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.log_level.upper() not in LOG_LEVELS:
        parser.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    if args.float32_matmul not in FLOAT32_MATMULS:
        parser.error(f"--float32-matmul must be one of {', '.join(FLOAT32_MATMULS)}")
    if args.float32_matmul == "gluon" and not gluon_available():
        parser.error("--float32-matmul gluon needs Triton with Gluon (3.6 or later)")


def parse_config(argv: list[str] | None = None, environ=None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="gradserve-server",
        description="Serve loss and gradients of MLP ensembles over gRPC. Every flag can "
        "also be set by the GRADSERVE_<FLAG> environment variable.",
    )
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        default = getattr(defaults, f.name)
        kind = type(default)
        variable = env_name(f.name)
        if variable in environ:
            try:
                default = kind(environ[variable])
            except ValueError:
                what = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
                parser.error(f"{variable}={environ[variable]!r} is not {what}")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{HELP[f.name]} (env {variable}; default %(default)s)",
        )
    args = parser.parse_args(argv)
    _check(parser, args)
    return ServerConfig(**vars(args))
