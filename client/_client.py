"""GradientClient: the synchronous client."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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


class GradientClient:
    """Synchronous gradserve client.

    Parameters
    ----------
    address : "host:port" of a server, or a list of them: jobs go round-robin, and a retry
        goes to the next one.
    timeout : default deadline in seconds for each job, retries included (None: none).
    chunk_bytes : size of upload chunks (default 1 MiB, at least 4096).
    token : bearer token for servers that require one.
    tls : use TLS (implied by any of the certificate arguments).
    root_certificates, client_certificate, client_key : PEM bytes or file paths: the CA to
        trust (default: the system's), and a client certificate for servers that ask one.
    retry : RetryPolicy for UNAVAILABLE / RESOURCE_EXHAUSTED (NO_RETRIES to disable).
    channel : an existing grpc.Channel to use instead (single address).

    Use as a context manager, or call close().
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
        channel: grpc.Channel | None = None,
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
        self._channels = (
            [channel]
            if channel
            else [self.connection.channel(a) for a in self.connection.addresses]
        )
        self._channel = self._channels[0]
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._computes = [compute_callable(c) for c in self._channels]
        self._failover = Failover(len(self._computes))
        # Notified as each job of this client ends: a job refused by a busy server retries
        # then rather than after its whole back-off, as its own siblings (compute_many)
        # are often what holds the room.
        self._job_ended = threading.Condition()
        self._closed = False

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        for channel in self._channels:
            channel.close()

    def _check_open(self) -> None:
        if self._closed:
            raise client_closed()

    def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """The server's version, engines, supported options and limits."""
        self._check_open()
        try:
            return self._stub.GetServerInfo(
                pb.GetServerInfoRequest(),
                timeout=call_timeout(timeout, self.timeout),
                metadata=self.connection.metadata,
            )
        except grpc.RpcError as e:
            raise GradserveError.from_rpc_error(e) from None

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of the server ("SERVING", "NOT_SERVING", ...)."""
        self._check_open()
        try:
            deadline = call_timeout(timeout, self.timeout)
            return _health.check(self._channel, service, timeout=deadline)
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
            input_gradients, per_sample_losses, per_sample_gradient_norms, forward_outputs,
            gradient_dtype, allow_non_finite, tag; DP-SGD: clip_norm, noise_multiplier,
            noise_seed (see gradserve.v1.PrivacyOptions); on_progress(phase, done_bytes,
            total_bytes) for the "upload" and the "download" of tensor bytes.

        Returns
        -------
        ComputeResult, with arrays of the kind the caller gave (numpy or torch).
        """
        job = build_job(normalize(model), inputs, targets, sample_weights, JobOptions(**options))
        return self._run(job, timeout)

    def compute_sharded(
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
        """compute() for a large ensemble, split along the model axis into `shards` slices
        (default: one per server address) that run on different servers at once; the
        results are merged back in order, equal to an unsharded run (DP noise excepted: each
        shard draws its own)."""
        count = shard_count(shards, len(self._computes))
        ensemble, jobs = sharded_jobs(model, inputs, targets, sample_weights, count, options)
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            parts = list(pool.map(lambda i: self._run(jobs[i], timeout, first=i),
                                  range(len(jobs))))  # fmt: skip
        return merge_results(ensemble, parts)

    def _run(self, job, timeout: float | None, first: int | None = None) -> ComputeResult:
        """Send one job; retry per the policy on the next address. `first` picks the address
        of the first attempt (default: round-robin)."""
        try:
            return self._attempts(job, timeout, first)
        finally:
            with self._job_ended:
                self._job_ended.notify_all()

    def _attempts(self, job, timeout: float | None, first: int | None) -> ComputeResult:
        timeout = call_timeout(timeout, self.timeout)
        first_attempt_at = time.monotonic()
        deadline = None if timeout is None else first_attempt_at + timeout
        index = self._failover.first(first)
        for attempt in itertools.count():
            self._check_open()  # closed before the job or while it waited to retry
            compute = self._computes[index]
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            assembler = ResultAssembler(job)
            sent = threading.Event()
            upload = Upload(job.requests(self.chunk_bytes), sent.set)
            call = compute(
                upload.messages(),
                timeout=remaining,
                metadata=self.connection.metadata,
            )
            try:
                for response in call:
                    assembler.add(response)
                    if assembler.untouched:
                        call.add_done_callback(lambda _, event=sent: event.set())  # on failure too
                        sent.wait()
                        assembler.prefault()
                result = assembler.result()
                self._failover.answered(index)
                return result
            except grpc.RpcError as e:
                if upload.error is not None:
                    raise upload.error from None
                if self._closed:
                    raise client_closed(while_running=True) from None
                delay = self.retry.delay(attempt, e, deadline, first_attempt_at)
                index, delay = self._failover.after(index, e, delay)
                if delay is None:
                    raise GradserveError.from_rpc_error(e) from None
                busy = busy_refusal(e)
            finally:
                call.cancel()  # no-op when finished; frees the stream if we stopped early
            if busy:
                with self._job_ended:
                    self._job_ended.wait(delay)
            else:
                time.sleep(delay)
        raise AssertionError("unreachable")

    def compute_many(
        self, jobs: Iterable[dict[str, Any]], *, max_in_flight: int = 16
    ) -> list[ComputeResult | GradserveError]:
        """Run many jobs with up to `max_in_flight` streams open at once, so the server can
        batch them. Each job is a dict of compute() arguments (model, inputs, targets, ...).
        Returns, in order, each job's result or the GradserveError it failed with. Every
        job is checked before any is sent: one the client itself refuses (ValueError,
        TypeError) raises, naming its position, and none runs."""
        check_max_in_flight(max_in_flight)
        checked = checked_jobs(jobs)

        def one(job: Mapping[str, Any]) -> ComputeResult | GradserveError:
            try:
                return self.compute(**job)
            except GradserveError as e:
                return e

        with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
            return list(pool.map(one, checked))
