"""GradientClient: the synchronous client."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from gradserve.client import _health
from gradserve.client._errors import GradserveError
from gradserve.client._job import (
    DEFAULT_CHUNK_BYTES,
    ComputeResult,
    JobOptions,
    ResultAssembler,
    build_job,
)
from gradserve.client._models import normalize
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import wire

# Every message stays under this: chunks default to 1 MiB, and a header of many descriptors
# is small. Raised from gRPC's 4 MiB default only to leave room for larger chunk settings.
MAX_MESSAGE_BYTES = 16 << 20


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class GradientClient:
    """Synchronous gradserve client.

    Parameters
    ----------
    address : "host:port" of a gradserve server.
    timeout : default deadline in seconds for each call (None: no deadline).
    chunk_bytes : size of upload chunks (default 1 MiB).

    Use as a context manager, or call close().
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        channel: grpc.Channel | None = None,
    ):
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._channel = channel or grpc.insecure_channel(address, options=channel_options())
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        # Compute through the copy-saving chunk codec (same wire format as the stub's).
        self._compute = self._channel.stream_stream(
            wire.COMPUTE_METHOD,
            request_serializer=wire.encode_message,
            response_deserializer=wire.decode_response,
        )

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """The server's version, engines, supported options and limits."""
        try:
            return self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=timeout or self.timeout
            )
        except grpc.RpcError as e:
            raise GradserveError.from_rpc_error(e) from None

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of the server ("SERVING", "NOT_SERVING", ...)."""
        try:
            return _health.check(self._channel, service, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise GradserveError.from_rpc_error(e) from None

    def compute(
        self,
        model: Any,
        inputs: Any,
        targets: Any,
        *,
        sample_weights: Any = None,
        timeout: float | None = None,
        **options: Any,
    ) -> ComputeResult:
        """Loss and gradients of every model of an ensemble.

        Parameters
        ----------
        model : nn.Sequential, list of nn.Sequential, or dict of stacked parameters
            (``layers.{i}.weight`` [M, d_out, d_in] or a ``stack_module_state`` dict).
        inputs : [M, N, d0], or [N, d0] shared by all models.
        targets : [M, N, dL] / [N, dL]; class indices [M, N] / [N] for cross_entropy.
        sample_weights : optional [M, N] / [N].
        timeout : deadline in seconds for this call.
        **options : fields of JobOptions: loss, reduction, huber_delta, hidden_activation,
            output_activation, negative_slope, precision, backend, parameter_gradients,
            input_gradients, per_sample_losses, forward_outputs, gradient_dtype,
            allow_non_finite, tag.

        Returns
        -------
        ComputeResult, with arrays of the kind the caller gave (numpy or torch).
        """
        job = build_job(normalize(model), inputs, targets, sample_weights, JobOptions(**options))
        assembler = ResultAssembler(job)
        call = self._compute(job.requests(self.chunk_bytes), timeout=timeout or self.timeout)
        try:
            for response in call:
                assembler.add(response)
        except grpc.RpcError as e:
            raise GradserveError.from_rpc_error(e) from None
        finally:
            call.cancel()  # no-op when finished; frees the stream if we stopped early
        return assembler.result()

    def compute_many(
        self, jobs: Iterable[dict[str, Any]], *, max_in_flight: int = 16
    ) -> list[ComputeResult | GradserveError]:
        """Run many jobs with up to `max_in_flight` streams open at once, so the server can
        batch them. Each job is a dict of compute() arguments (model, inputs, targets, ...).
        Returns, in order, each job's result or the GradserveError it failed with."""

        def one(job: dict[str, Any]) -> ComputeResult | GradserveError:
            try:
                return self.compute(**job)
            except GradserveError as e:
                return e

        with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
            return list(pool.map(one, jobs))
