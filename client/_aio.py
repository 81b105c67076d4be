"""AsyncGradientClient: the asyncio twin of GradientClient."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from gradserve.client import _health
from gradserve.client._connection import (
    Connection,
    Failover,
    RetryPolicy,
    busy_refusal,
    call_timeout,
    check_settings,
    compute_callable,
)
from gradserve.client._errors import GradserveError, client_closed
from gradserve.client._job import (
    DEFAULT_CHUNK_BYTES,
    ComputeResult,
    JobOptions,
    ResultAssembler,
    Upload,
    build_job,
)
from gradserve.client._many import check_max_in_flight, checked_jobs
from gradserve.client._models import normalize
from gradserve.client._sharding import merge_results, shard_count, sharded_jobs
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc


class AsyncGradientClient:
    """Asyncio gradserve client; same arguments and results as GradientClient.

    Use as ``async with AsyncGradientClient(address) as client:``.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        timeout: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | str | None = None,
        client_certificate: bytes | str | None = None,
        client_key: bytes | str | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - immutable
    ):
        self.connection = Connection.of(
            address, token=token, tls=tls, root_certificates=root_certificates,
            client_certificate=client_certificate, client_key=client_key,
        )  # fmt: skip
        self.address = self.connection.addresses[0]
        check_settings(timeout, chunk_bytes)
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.retry = retry
        self._channels = [self.connection.channel(a, aio=True) for a in self.connection.addresses]
        self._channel = self._channels[0]
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._computes = [compute_callable(c) for c in self._channels]
        self._failover = Failover(len(self._computes))
        self._job_ended = asyncio.Condition()  # as in GradientClient
        self._closed = False

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for channel in self._channels:
            await channel.close()

    def _check_open(self) -> None:
        if self._closed:
            raise client_closed()

    async def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        self._check_open()
        try:
            return await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(),
                timeout=call_timeout(timeout, self.timeout),
                metadata=self.connection.metadata,
            )
        except grpc.RpcError as e:
            raise GradserveError.from_rpc_error(e) from None

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """See GradientClient.health."""
        self._check_open()
        try:
            deadline = call_timeout(timeout, self.timeout)
            return await _health.check(self._channel, service, timeout=deadline)
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
        return await self._run(job, timeout)

    async def compute_sharded(
        self,
        model: Any,
        inputs: Any,
        targets: Any,
        *,
        sample_weights: Any = None,
        shards: int | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> ComputeResult:
        """See GradientClient.compute_sharded."""
        count = shard_count(shards, len(self._computes))
        ensemble, jobs = sharded_jobs(model, inputs, targets, sample_weights, count, options)
        parts = await asyncio.gather(*(self._run(j, timeout, first=i) for i, j in enumerate(jobs)))
        return merge_results(ensemble, list(parts))

    async def _run(self, job, timeout: float | None, first: int | None = None) -> ComputeResult:
        """Send one job; retry per the policy on the next address. `first` picks the address
        of the first attempt (default: round-robin)."""
        try:
            return await self._attempts(job, timeout, first)
        finally:
            async with self._job_ended:
                self._job_ended.notify_all()

    async def _wait_for_a_job_to_end(self, seconds: float) -> None:
        async with self._job_ended:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._job_ended.wait(), seconds)

    async def _attempts(self, job, timeout: float | None, first: int | None) -> ComputeResult:
        timeout = call_timeout(timeout, self.timeout)
        first_attempt_at = time.monotonic()
        deadline = None if timeout is None else first_attempt_at + timeout
        index = self._failover.first(first)
        for attempt in itertools.count():
            self._check_open()  # closed before the job or while it waited to retry
            compute = self._computes[index]
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            assembler = ResultAssembler(job)
            sent = asyncio.Event()  # gRPC takes the requests on this event loop
            upload = Upload(job.requests(self.chunk_bytes), sent.set)
            call = compute(
                upload.messages(),
                timeout=remaining,
                metadata=self.connection.metadata,
            )
            statuses = ServerStatus()
            call.add_done_callback(statuses.record)
            try:
                async for response in call:
                    assembler.add(response)
                    if assembler.untouched:
                        call.add_done_callback(lambda _, event=sent: event.set())  # on failure too
                        await sent.wait()
                        # Off the event loop: other jobs keep moving.
                        await asyncio.to_thread(assembler.prefault)
                result = assembler.result()
                self._failover.answered(index)
                return result
            except grpc.RpcError as error:
                if upload.error is not None:
                    raise upload.error from None
                e = statuses.genuine(error)
                delay = self.retry.delay(attempt, e, deadline, first_attempt_at)
                index, delay = self._failover.after(index, e, delay)
                if delay is None:
                    raise GradserveError.from_rpc_error(e) from None
                busy = busy_refusal(e)
            except asyncio.CancelledError:
                if upload.error is not None:  # gRPC's answer to a failed request iterator
                    raise upload.error from None
                if self._closed and not _task_cancelling():
                    # grpc.aio cancels the calls of a closed channel: tell the caller, whose
                    # own task was not cancelled, as the sync client does.
                    raise client_closed(while_running=True) from None
                raise  # this task was cancelled
            finally:
                call.cancel()
            if busy:
                await self._wait_for_a_job_to_end(delay)
            else:
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def compute_many(
        self, jobs: Iterable[dict[str, Any]], *, max_in_flight: int = 64
    ) -> list[ComputeResult | GradserveError]:
        """Run many jobs concurrently (at most `max_in_flight` at once); see
        GradientClient.compute_many."""
        check_max_in_flight(max_in_flight)
        checked = checked_jobs(jobs)
        gate = asyncio.Semaphore(max_in_flight)

        async def one(job: Mapping[str, Any]) -> ComputeResult | GradserveError:
            async with gate:
                try:
                    return await self.compute(**job)
                except GradserveError as e:
                    return e

        return list(await asyncio.gather(*(one(job) for job in checked)))


CORE_INTERNAL_DETAILS = "Internal error from Core"


class ServerStatus:
    """The status the server ended a call with, kept from being replaced.

    When a server ends a stream while the client is still sending (a job refused from its
    header: over the limits, busy, malformed), grpc.aio's write that fails after the
    server's status arrived replaces that status with INTERNAL "Internal error from Core"
    (grpc/grpc#36066). The sync API reports the server's status; so does this client, from
    the status its done callback saw first, so that busy refusals are retried and errors
    name their cause."""

    def __init__(self) -> None:
        self.seen: list[grpc.aio.AioRpcError] = []

    def record(self, call: grpc.aio.Call) -> None:
        # Called as the status is set, so these coroutines finish without suspending.
        code, details, trailing = (
            _finished(call.code()), _finished(call.details()), _finished(call.trailing_metadata())
        )  # fmt: skip
        if code is not None:
            self.seen.append(
                grpc.aio.AioRpcError(
                    code, grpc.aio.Metadata(), trailing or grpc.aio.Metadata(), details
                )
            )

    def genuine(self, error: grpc.RpcError) -> grpc.RpcError:
        """`error`, or the server's own status where grpc.aio replaced it."""
        if error.code() != grpc.StatusCode.INTERNAL or error.details() != CORE_INTERNAL_DETAILS:
            return error
        for status in self.seen:
            if status.details() != CORE_INTERNAL_DETAILS:
                return status
        return error


def _task_cancelling() -> bool:
    """Whether someone asked to cancel the current task (Python 3.11+ can tell)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _finished(coroutine):
    """The value of a coroutine that completes without suspending, else None."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    return None
