"""AsyncGradientClient: the asyncio twin of GradientClient."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc

from gradserve.client._client import channel_options
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


class AsyncGradientClient:
    """Asyncio gradserve client; same arguments and results as GradientClient.

    Use as ``async with AsyncGradientClient(address) as client:``.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._channel = grpc.aio.insecure_channel(address, options=channel_options())
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        # Compute through the copy-saving chunk codec (same wire format as the stub's).
        self._compute = self._channel.stream_stream(
            wire.COMPUTE_METHOD,
            request_serializer=wire.encode_message,
            response_deserializer=wire.decode_response,
        )

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        try:
            return await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=timeout or self.timeout
            )
        except grpc.RpcError as e:
            raise GradserveError.from_rpc_error(e) from None

    async def compute(
        self,
        model: Any,
        inputs: Any,
        targets: Any,
        *,
        sample_weights: Any = None,
        timeout: float | None = None,
        **options: Any,
    ) -> ComputeResult:
        """See GradientClient.compute."""
        job = build_job(normalize(model), inputs, targets, sample_weights, JobOptions(**options))
        assembler = ResultAssembler(job)
        call = self._compute(job.requests(self.chunk_bytes), timeout=timeout or self.timeout)
        try:
            async for response in call:
                assembler.add(response)
        except grpc.RpcError as e:
            raise GradserveError.from_rpc_error(e) from None
        finally:
            call.cancel()
        return assembler.result()

    async def compute_many(
        self, jobs: Iterable[dict[str, Any]], *, max_in_flight: int = 64
    ) -> list[ComputeResult | GradserveError]:
        """Run many jobs concurrently (at most `max_in_flight` at once); see
        GradientClient.compute_many."""
        gate = asyncio.Semaphore(max_in_flight)

        async def one(job: dict[str, Any]) -> ComputeResult | GradserveError:
            async with gate:
                try:
                    return await self.compute(**job)
                except GradserveError as e:
                    return e

        return list(await asyncio.gather(*(one(job) for job in jobs)))
