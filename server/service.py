"""GradientService: the Compute stream (header -> chunks -> results) and GetServerInfo."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

import gradserve
from gradserve import kernels
from gradserve.kernels import (
    EngineUnavailable,
    EnsembleResult,
    compiled_kernels,
    engines,
    sample_blocks,
)
from gradserve.server import codec
from gradserve.server.admission import Admission
from gradserve.server.assembly import PayloadAssembler
from gradserve.server.batching import BatchingPolicy, DynamicBatcher, Launched
from gradserve.server.buffers import BufferPool
from gradserve.server.config import ServerConfig
from gradserve.server.errors import (
    JobError,
    invalid,
    refusing_out_of_memory,
    status_details,
    unsupported,
)
from gradserve.server.heartbeats import HEARTBEAT, awaited_with_heartbeats
from gradserve.server.memory import HeapRelease
from gradserve.server.metrics import Metrics
from gradserve.server.streaming import MicroBatchSteps, SampleStream, finish, per_sample_rows
from gradserve.server.timers import IdleTimer, TimedWrites, UploadTimer
from gradserve.server.validation import (
    ACTIVATION_NAMES,
    LOSS_NAMES,
    MIN_UPLOAD_CHUNK_BYTES,
    PRECISION_NAMES,
    JobPlan,
    validate_header,
)
from gradserve.server.worker import DeviceWorker
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import wire
from gradserve.v1.shapes import PER_SAMPLE_RESULTS

log = logging.getLogger("gradserve.server")

try:
    # What grpcio raises where a write fails because the client went away (a private name).
    from grpc._cython.cygrpc import ExecuteBatchError as StreamOperationFailed
except ImportError:  # a grpcio that moved it: such a failure is logged as a fault again

    class StreamOperationFailed(Exception):  # type: ignore[no-redef]
        pass


# Payload checks and result serialisation below this size run on the event loop: measured
# with 64 concurrent small jobs, thread hops for them cost more than the work itself.
INLINE_IO_BYTES = 256 << 10
# Idle seconds after which the heap's freed memory goes back to the system (memory.py): long
# enough that a client's next job, sent after it has used the last one's results, finds the
# memory still mapped. While jobs keep the server busy, it goes back every few seconds.
RELEASE_MEMORY_AFTER_IDLE_S = 1.0
RELEASE_MEMORY_WHILE_BUSY_S = 5.0
SAFE_LOG_TEXT = re.compile(r"[\w.:/@+,-]*", re.ASCII)


class ClientGone(Exception):
    """Raised on the device thread to stop the optimiser steps of an abandoned job."""


def log_value(value) -> str:
    """A value of the key=value job log line. Text from the client (its tag) is quoted and
    escaped when it holds anything but plain characters, so that no client can break the
    line up or write a line of its own into the log."""
    text = str(value)
    if isinstance(value, str) and not SAFE_LOG_TEXT.fullmatch(text):
        return json.dumps(text)
    return text


def result_tensors(plan: JobPlan, result: EnsembleResult) -> dict[str, torch.Tensor]:
    """Result tensors by wire name (see plan.result_descriptors() for the sending order)."""
    if result.losses is not None:  # optimiser steps: losses, parameters, optimiser state
        by_name = {"losses": result.losses}
        for i in range(plan.mlp.num_layers):
            by_name[f"layers.{i}.weight"] = result.weights[i]
            by_name[f"layers.{i}.bias"] = result.biases[i]
        by_name.update(result.optimizer_state or {})
        return by_name
    by_name: dict[str, torch.Tensor] = {"loss": result.loss}
    if result.per_sample_loss is not None:
        by_name["per_sample_loss"] = result.per_sample_loss
    if result.per_sample_grad_norm is not None:
        by_name["per_sample_grad_norm"] = result.per_sample_grad_norm
    if result.outputs is not None:
        by_name["outputs"] = result.outputs
    for i in range(plan.mlp.num_layers):
        if result.weight_grads is not None:
            by_name[f"layers.{i}.weight.grad"] = result.weight_grads[i]
            by_name[f"layers.{i}.bias.grad"] = result.bias_grads[i]
    if result.input_grads is not None:
        by_name["inputs.grad"] = result.input_grads
    return by_name


class ChunkPacker:
    """Result chunks packed into response messages of up to `budget` data bytes each (small
    tensors' chunks share a message); `prefix` (a deferred accepted message) goes first."""

    def __init__(self, write, budget: int, prefix: bytes = b""):
        self.write, self.budget = write, budget
        self.pending, self.pending_bytes = [prefix] if prefix else [], 0

    async def add(self, name: str, offset: int, piece) -> None:
        if self.full(len(piece)):
            await self.flush()
        self.put(name, offset, piece)

    def full(self, size: int) -> bool:
        """A piece of `size` bytes would take the pending message past its budget."""
        return bool(self.pending) and self.pending_bytes + size > self.budget

    def put(self, name: str, offset: int, piece) -> None:
        """Add a piece to the pending message (add() without the flush, for callers adding
        many small pieces, which flush when full())."""
        self.pending.append(wire.encode_chunk(name, offset, piece))
        self.pending_bytes += len(piece)

    async def flush(self, last: bytes = b"") -> None:
        """Write what is pending, `last` (the summary) with it."""
        if last:
            self.pending.append(last)
        if self.pending:
            await self.write(b"".join(self.pending) if len(self.pending) > 1 else self.pending[0])
        self.pending, self.pending_bytes = [], 0


def one_write_at_a_time(write):
    """`write` (a stream's) for writers that may overlap: gRPC takes one write at a time."""
    lock = asyncio.Lock()

    async def locked(message: bytes) -> None:
        async with lock:
            await write(message)

    return locked


def per_sample(plan: JobPlan, d: pb.TensorDescriptor) -> bool:
    """A streamed job's per-sample result: sent micro-batch by micro-batch, never whole."""
    return bool(plan.micro_batch_samples) and d.name in PER_SAMPLE_RESULTS


def held_result_bytes(plan: JobPlan, d: pb.TensorDescriptor) -> int:
    """Bytes of a result the server holds at once: all of it, or of a streamed job's
    per-sample result two micro-batches' rows (the engine's and their wire form)."""
    nbytes = codec.nbytes(d.dtype, d.shape)
    if per_sample(plan, d):
        return 2 * nbytes * plan.samples_at_once // plan.num_samples
    return nbytes


def handlers(service: GradientService) -> grpc.GenericRpcHandler:
    """The service's RPCs; Compute uses the copy-saving chunk codec (gradserve.v1.wire)."""
    return grpc.method_handlers_generic_handler(
        "gradserve.v1.GradientService",
        {
            "Compute": grpc.stream_stream_rpc_method_handler(
                service.Compute,
                request_deserializer=wire.decode_request,
                response_serializer=wire.encode_message,
            ),
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                service.GetServerInfo,
                request_deserializer=pb.GetServerInfoRequest.FromString,
                response_serializer=pb.GetServerInfoResponse.SerializeToString,
            ),
        },
    )


class GradientService(pb_grpc.GradientServiceServicer):
    def __init__(self, config: ServerConfig, device: torch.device):
        self.config = config
        compiled_kernels.set_limit(config.max_compiled_kernels)
        engines.set_float32_matmul(config.float32_matmul)
        compiled_kernels.set_disk_limit(config.max_kernel_cache_bytes)
        if device.type == "cuda":  # only GPU jobs compile: a CPU server leaves the cache be
            compiled_kernels.prune_disk()
        self.device = device
        self.worker = DeviceWorker(device)
        self.batcher = DynamicBatcher(
            self.worker,
            BatchingPolicy(
                max_delay_s=config.batch_max_delay_ms / 1000,
                max_jobs=max(1, config.batch_max_jobs),
                max_models=config.batch_max_models,
                max_bytes=config.batch_max_bytes,
            ),
            on_launch=lambda *launch: self.metrics.launched(*launch),
        )
        # Payload checks and result serialisation: off the event loop, and off the device
        # thread so they never wait behind a launch.
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="payload-io")
        self.memory_release = HeapRelease(
            RELEASE_MEMORY_AFTER_IDLE_S,
            RELEASE_MEMORY_WHILE_BUSY_S,
            busy=lambda: self.admission.inflight_jobs > 0,
            run_in_thread=lambda fn: asyncio.get_running_loop().run_in_executor(self.io, fn),
        )
        self.admission = Admission(
            config.max_inflight_bytes,
            config.max_queued_jobs,
            config.retry_pushback_ms,
            on_idle=self.memory_release.idle,
        )
        self.buffers = BufferPool(config.reuse_buffer_bytes)
        self.completed_jobs = 0
        self.failed_jobs = 0
        self.metrics = Metrics(self)
        # Set on SIGTERM: admitted jobs finish, new ones get UNAVAILABLE.
        self.draining = False

    async def start(self) -> None:
        # Engines warm up on the device thread that will run every launch.
        await self.worker.call(kernels.warm_up, self.device)
        self.batcher.start()
        self.memory_release.start()

    async def stop(self) -> None:
        self.memory_release.stop()
        await self.batcher.stop()
        self.worker.shutdown()
        self.io.shutdown(wait=False, cancel_futures=True)

    async def GetServerInfo(self, request, context):
        engine_infos = [
            pb.EngineInfo(
                name=name,
                device=str(self.device),
                precisions=[k for k, v in PRECISION_NAMES.items() if v in precisions and k != 0],
                float32_matmul=engines.float32_matmul() if name == "triton" else "",
                library=kernels.engine_library(name),
            )
            for name, precisions in kernels.available_engines(self.device).items()
        ]
        c, policy = self.config, self.batcher.policy
        return pb.GetServerInfoResponse(
            version=gradserve.__version__,
            engines=engine_infos,
            activations=sorted(k for k in ACTIVATION_NAMES if k),
            losses=sorted(k for k in LOSS_NAMES if k),
            dtypes=sorted(codec.ITEM_SIZES),
            limits=pb.Limits(
                max_job_bytes=c.max_job_bytes,
                max_models=c.max_models,
                max_samples=c.max_samples,
                max_width=c.max_width,
                max_layers=c.max_layers,
                max_chunk_bytes=c.max_chunk_bytes,
                default_chunk_bytes=c.chunk_bytes,
                max_queued_jobs=c.max_queued_jobs,
                max_inflight_bytes=c.max_inflight_bytes,
                max_optimizer_steps=c.max_optimizer_steps,
                max_work_bytes=c.max_work_bytes,
                upload_idle_timeout_seconds=c.upload_idle_timeout_s,
                download_idle_timeout_seconds=c.download_idle_timeout_s,
                min_upload_bytes_per_second=c.min_upload_bytes_per_s,
                stream_window_bytes=c.stream_window_bytes,
            ),
            batching=pb.BatchingPolicy(
                max_delay_seconds=policy.max_delay_s,
                max_jobs=policy.max_jobs,
                max_models=policy.max_models,
                max_bytes=policy.max_bytes,
            ),
            stats=pb.ServerStats(
                launches=self.batcher.launches,
                launched_jobs=self.batcher.launched_jobs,
                launched_models=self.batcher.launched_models,
                queued_jobs=self.batcher.queued_jobs,
                inflight_jobs=self.admission.inflight_jobs,
                inflight_bytes=self.admission.inflight_bytes,
                completed_jobs=self.completed_jobs,
                failed_jobs=self.failed_jobs,
            ),
        )

    async def _read(self, context, idle: UploadTimer) -> pb.ComputeRequest | None:
        """Next request message, None at the end of the stream (its tensor bytes counted
        towards the upload's minimum rate)."""
        idle.arm()
        try:
            msg = await context.read()
        finally:
            idle.disarm()
        if msg is grpc.aio.EOF:
            return None
        idle.received(sum(len(chunk.data) for chunk in msg.chunks))
        return msg

    async def _read_after_first(self, context, idle: UploadTimer, missing):
        """_read; a timeout that ends a client which sent every tensor byte but keeps its
        request stream open (waiting for the results before it closes) says that the
        half-close was awaited."""
        started = time.perf_counter()
        try:
            return await self._read(context, idle)
        except asyncio.CancelledError:
            if (idle.fired or idle.too_slow) and not missing():
                idle.unclosed_s = time.perf_counter() - started
            raise

    def _timed_out(self, idle: UploadTimer, unread: IdleTimer) -> tuple[str, str] | None:
        """(the timer, the client's message) for a job one of its timers ended; None for
        one whose client went away."""
        c = self.config
        if idle.unclosed_s is not None:
            return "half_close", (
                f"every tensor byte arrived, but the request stream was not half-closed in "
                f"the {idle.unclosed_s:.1f} s the server waited: half-close it after the last "
                f"chunk"
            )
        if idle.too_slow:
            return "upload_rate", (
                f"the upload came slower than the server's minimum of "
                f"{c.min_upload_bytes_per_s} bytes/s: {idle.received_bytes} tensor bytes in "
                f"{idle.waited_s:.1f} s of waiting for them"
            )
        if idle.fired:
            return "upload_idle", f"no request message for {c.upload_idle_timeout_s} s"
        if unread.fired:
            return "download_idle", (
                f"the client read no result message for {c.download_idle_timeout_s} s"
            )
        return None

    def _io(self, nbytes: int, fn, *args) -> asyncio.Future:
        """Run fn off the event loop, unless it touches so few bytes that the thread hop
        (and the GIL hand-over it costs the engine thread) would cost more than the work."""
        if nbytes <= INLINE_IO_BYTES:
            done = asyncio.get_running_loop().create_future()
            done.set_result(fn(*args))
            return done
        return asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    async def Compute(self, request_iterator, context):
        job_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        outcome, info, phases = "CANCELLED", {}, {}
        idle = UploadTimer(self.config.upload_idle_timeout_s, self.config.min_upload_bytes_per_s)
        unread = IdleTimer(self.config.download_idle_timeout_s)
        abort = None  # (code, message, trailers) that end the call once the job is counted
        try:
            try:
                if self.draining:
                    raise JobError(
                        grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica"
                    )
                await self._compute(job_id, TimedWrites(context, unread), info, idle, phases)
            except asyncio.CancelledError:
                timed_out = self._timed_out(idle, unread)
                if timed_out is None:
                    raise  # the client went away
                info["timeout"], message = timed_out
                raise JobError(grpc.StatusCode.DEADLINE_EXCEEDED, message) from None
            outcome = "ok"
        except JobError as e:
            outcome = e.code.name
            info["message"] = e.message
            trailers = status_details(e)
            if e.retry_pushback_ms is not None:
                trailers += (("grpc-retry-pushback-ms", str(e.retry_pushback_ms)),)
            abort = (e.code, e.message, trailers)
        except Exception as e:  # a fault of the server, never of the job's input
            if isinstance(e, StreamOperationFailed):
                # The client went away while a write of ours waited for it to read: the write
                # fails (grpcio's ExecuteBatchError, which its aio server catches too) before
                # the call shows as cancelled. No fault, and no one to tell.
                return
            outcome = "INTERNAL"
            log.exception("job=%s failed inside the server", job_id)
            abort = (grpc.StatusCode.INTERNAL, f"server error: {type(e).__name__}", ())
        finally:
            if outcome == "ok":
                self.completed_jobs += 1
            else:
                self.failed_jobs += 1
            self.metrics.job_done(outcome, phases, info.get("timeout"))
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "job=%s peer=%s outcome=%s seconds=%.4f %s",
                    job_id,
                    context.peer(),
                    outcome,
                    time.perf_counter() - started,
                    " ".join(f"{k}={log_value(v)}" for k, v in info.items()),
                )
        if abort is not None:
            # Counted and logged first: the status goes out after every message written before
            # it, so for a client that stopped reading it waits until that client reads again
            # or leaves, and the job is over either way.
            code, message, trailers = abort
            await context.abort(code, message, trailing_metadata=trailers)

    async def _compute(
        self, job_id: str, context, info: dict, idle: UploadTimer, phases: dict
    ) -> None:
        header_at = time.perf_counter()
        first = await self._read(context, idle)
        if first is None:
            raise invalid("request stream ended before the job header")
        if isinstance(first, wire.MalformedMessage):
            raise invalid("request message is not a valid ComputeRequest")
        if not first.HasField("header"):
            raise invalid("the first request message must carry the job header")
        plan = validate_header(first.header, self.config, self.device.type)
        try:
            engine = kernels.select_engine(
                plan.backend,
                plan.precision,
                self.device,
                plan.needs_per_sample_norms,
                plan.mlp.layer_sizes,
                plan.allow_non_finite,
                plan.samples_at_once,
            )
        except EngineUnavailable as e:
            raise unsupported(str(e)) from None
        info.update(
            engine=engine,
            M=plan.num_models,
            N=plan.num_samples,
            layers=list(plan.mlp.layer_sizes),
            tag=plan.client_tag,
        )
        descriptors = plan.result_descriptors()
        result_bytes = sum(held_result_bytes(plan, d) for d in descriptors)

        # A streamed job stops reading two micro-batches ahead of its compute, and then a
        # fixed stream window's worth of its bytes wait in gRPC on top of those it holds (a
        # one-shot job is read as it arrives, its waiting bytes part of the payload counted).
        read_ahead = self.config.stream_window_bytes if plan.micro_batch_samples else 0
        held = plan.held_bytes + result_bytes + read_ahead
        with self.admission.reserve(held), self.batcher.holding():
            accepted = pb.ComputeResponse(
                accepted=pb.JobAccepted(
                    job_id=job_id, engine=engine, device=str(self.device), results=descriptors
                )
            ).SerializeToString()
            # result bytes sent while the job ran (losses of optimiser steps, a streamed job's
            # per-sample rows)
            streamed = 0
            if plan.micro_batch_samples:
                await context.write(accepted)
                accepted = b""
                launched, uploaded, streamed = await self._run_streamed(
                    context, idle, plan, engine, first
                )
                # sent as they came: per-sample rows, and the losses of steps per micro-batch
                descriptors = [
                    d
                    for d in descriptors
                    if not per_sample(plan, d)
                    and not (plan.steps_per_micro_batch and d.name == "losses")
                ]
            else:
                assembler = PayloadAssembler(plan, pool=self.buffers)
                plan.check_chunk_count(len(first.chunks))
                for chunk in first.chunks:
                    assembler.add(chunk)
                if assembler.missing():  # a multi-message upload: acknowledge the header now
                    await context.write(accepted)
                    accepted = b""
                # else the job came in one message: its accepted message leaves with the
                # first results, saving a stream operation (most of a small job's cost).
                async for chunks in self._later_chunks(
                    context, idle, plan, first, assembler.missing
                ):
                    for chunk in chunks:
                        assembler.add(chunk)
                job = await self._io(plan.payload_bytes, assembler.finish)
                del assembler  # the job's tensors are views of its buffers
                uploaded = time.perf_counter()
                with refusing_out_of_memory():
                    if plan.optimizer is None:
                        launched, accepted = await awaited_with_heartbeats(
                            self.batcher.submit(job, engine, plan.payload_bytes),
                            context.write,
                            self.config.heartbeat_s,
                            accepted,
                        )
                    else:
                        launched, streamed = await self._train(
                            context, plan, job, engine, accepted, descriptors[0].dtype
                        )
                        accepted = b""
                        descriptors = [d for d in descriptors if d.name != "losses"]
                del job
            ready = time.perf_counter()  # results computed: sending them starts
            info.update(
                jobs_in_launch=launched.jobs_in_launch,
                queue_s=round(launched.queue_seconds, 4),
                compute_s=round(launched.compute_seconds, 4),
            )

            def summary(sent: int) -> pb.ComputeResponse:
                # A streamed job's queue and compute times overlap its upload: the download
                # is timed from the moment the results were ready, not from the upload's end.
                phases.update(
                    upload=uploaded - header_at,
                    queue=launched.queue_seconds,
                    compute=launched.compute_seconds,
                    download=time.perf_counter() - ready,
                )
                return pb.ComputeResponse(
                    summary=pb.JobSummary(
                        timings=pb.Timings(
                            upload_seconds=phases["upload"],
                            queue_seconds=phases["queue"],
                            compute_seconds=phases["compute"],
                            download_seconds=phases["download"],
                        ),
                        flops=kernels.flops(plan.mlp, plan.num_models, plan.num_samples)
                        * plan.passes,
                        bytes_received=plan.payload_bytes,
                        bytes_sent=sent,
                        jobs_in_launch=launched.jobs_in_launch,
                        models_in_launch=launched.models_in_launch,
                        launch_flops=launched.launch_flops,
                        achieved_flops_per_second=launched.launch_flops
                        / max(launched.compute_seconds, 1e-9),
                    )
                )

            sent = streamed + await self._send_results(
                context, plan, descriptors, launched.result, summary, accepted, streamed
            )
            info.update(bytes_in=plan.payload_bytes, bytes_out=sent)

    async def _later_chunks(self, context, idle: UploadTimer, plan: JobPlan, first, missing):
        """The chunks of each request message after the first, message by message (the
        number of chunks counted from the first message's on). `missing()`: the tensor bytes
        yet to come (empty once only the half-close is awaited)."""
        messages, chunks = 1, len(first.chunks)
        while (msg := await self._read_after_first(context, idle, missing)) is not None:
            messages += 1
            if messages > plan.max_request_messages:
                raise invalid(
                    f"the job's {plan.payload_bytes} tensor bytes came in more than "
                    f"{plan.max_request_messages} request messages; send chunks of at least "
                    f"{MIN_UPLOAD_CHUNK_BYTES} bytes (several small ones may share a message)"
                )
            if isinstance(msg, wire.MalformedMessage):
                raise invalid("request message is not a valid ComputeRequest")
            if msg.HasField("header"):
                raise invalid("a job has exactly one header")
            if not msg.chunks:
                raise invalid("request message carries neither header nor chunks")
            chunks += len(msg.chunks)
            plan.check_chunk_count(chunks)
            yield msg.chunks

    async def _run_streamed(self, context, idle: UploadTimer, plan: JobPlan, engine: str, first):
        """A streamed job (server.streaming): each micro-batch launches as soon as its
        samples are in, while the next one's bytes are read; at most one is in flight. Its
        per-sample results are sent as soon as it is computed (so a client may wait for them
        before sending the next micro-batch), and so is its optimiser step's loss for a job
        that takes a step on each. Returns (launched, when the last sample byte arrived,
        result bytes sent)."""
        stream = SampleStream(plan)
        total, queued, computed, sent = None, 0.0, 0.0, 0
        stepping: MicroBatchSteps | None = None  # a job taking a step on each micro-batch
        descriptors = plan.result_descriptors()
        losses_dtype = descriptors[0].dtype  # a training job's "losses" come first
        rows = [d for d in descriptors if per_sample(plan, d)]
        # bytes a micro-batch's results add to the totals: its gradients and per-sample rows
        added_bytes = sum(plan.tensors[n].nbytes for n in plan.tensors if n.startswith("layers."))
        per_sample_bytes = sum(codec.nbytes(d.dtype, d.shape) for d in rows)
        added_bytes += per_sample_bytes * plan.samples_at_once // plan.num_samples
        # The micro-batch in flight as one task: computed, added to the totals, its rows sent.
        settling: asyncio.Task | None = None
        # Its row writes and the heartbeats while it is awaited share the stream.
        write = one_write_at_a_time(context.write)

        async def settle(computing, start: int) -> None:
            nonlocal total, queued, computed, sent
            # Heartbeats while it waits and computes: its client may be waiting for its rows
            # (the server then waits in a read), or the upload stalled behind it.
            done, _ = await awaited_with_heartbeats(computing, write, self.config.heartbeat_s)
            queued += done.queue_seconds
            computed += done.compute_seconds
            if stepping is not None:  # its step, and its losses sent
                k = start // plan.micro_batch_samples
                row = await self.worker.call(stepping.take, k, done.result, losses_dtype)
                await write(wire.encode_chunk("losses", k * len(row), row))
                sent += len(row)
                return
            total = await self._io(added_bytes, sample_blocks.add, total, done.result)
            if rows:
                sent += await self._send_rows(write, plan, rows, done.result, start)

        async def settled() -> None:
            """Wait for the micro-batch in flight (the upload stalls meanwhile)."""
            if settling is not None:
                await settling

        def interrupt_read_on_failure(task: asyncio.Task) -> None:
            # A client may wait for a micro-batch's rows before sending the next one.
            if not task.cancelled() and task.exception() is not None:
                idle.interrupt()

        async def launch_ready() -> None:
            nonlocal settling, stepping
            while stream.ready:
                first_sample, micro = stream.ready.popleft()
                await settled()
                if plan.steps_per_micro_batch:  # on the parameters the last step left
                    if stepping is None:
                        stepping = await self.worker.call(
                            MicroBatchSteps, plan, stream.parameters(), self.device
                        )
                    micro = stepping.job(micro, first_sample // plan.micro_batch_samples)
                computing = self.batcher.submit(micro, engine, stream.micro_batch_bytes())
                settling = asyncio.ensure_future(settle(computing, first_sample))
                idle.computing(True)  # the client may wait for its rows meanwhile
                settling.add_done_callback(lambda _: idle.computing(False))
                settling.add_done_callback(interrupt_read_on_failure)

        try:
            with refusing_out_of_memory():
                plan.check_chunk_count(len(first.chunks))
                for chunk in first.chunks:
                    stream.add(chunk)
                await launch_ready()
                try:
                    async for chunks in self._later_chunks(
                        context, idle, plan, first, stream.missing
                    ):
                        for chunk in chunks:
                            stream.add(chunk)
                        await launch_ready()
                except asyncio.CancelledError:
                    if not idle.interrupted:
                        raise
                    raise settling.exception() from None  # the micro-batch's, not the client's
                uploaded = time.perf_counter()
                if not stream.done:
                    raise invalid(
                        f"request stream ended before all tensor bytes arrived: {stream.missing()}"
                    )
                await settled()  # the last micro-batch
        finally:
            if settling is not None:
                settling.cancel()  # a no-op once done
                if settling.done() and not settling.cancelled():
                    settling.exception()  # its failure, if any, comes second to the one raised
        flops = kernels.flops(plan.mlp, plan.num_models, plan.num_samples)
        if stepping is not None:
            result = stepping.result(engine)
        else:
            result = await self.worker.call(finish, total, plan, stream.parameters(), self.device)
        launched = Launched(result, 1, plan.num_models, flops, queued, computed)
        return launched, uploaded, sent

    async def _send_rows(self, write, plan: JobPlan, descriptors, part, start: int) -> int:
        """Send a micro-batch's per-sample results (its samples from `start` on): of each
        [M, N, ...] tensor, each model's rows where they go, a chunk per model and up to
        the chunk size (each model's rows are a run of their own, arriving in order, as
        in a streamed upload). Returns the bytes sent."""
        tensors = per_sample_rows(part, plan)
        budget, n = plan.response_chunk_bytes, plan.num_samples
        packer, sent = ChunkPacker(write, budget), 0
        for d in descriptors:
            tensor = tensors.pop(d.name)
            data = await self._io(tensor.numel() * tensor.element_size(),
                                  codec.tensor_to_bytes, tensor, d.dtype, d.name)  # fmt: skip
            run = codec.nbytes(d.dtype, d.shape) // plan.num_models  # a model's N rows
            count = len(data) // plan.num_models  # a model's rows of this micro-batch
            for m in range(plan.num_models):
                first = m * run + start * (run // n)
                for offset in range(0, count, budget):
                    piece = data[m * count + offset : m * count + min(offset + budget, count)]
                    if packer.full(len(piece)):
                        await packer.flush()
                    packer.put(d.name, first + offset, piece)
            sent += len(data)
        await packer.flush()
        return sent

    async def _train(self, context, plan: JobPlan, job, engine: str, prefix: bytes, dtype: int):
        """Run a job's optimiser steps, streaming each step's losses (a row of "losses", of
        wire dtype `dtype`) as soon as the step's forward pass is done. Returns (launched,
        bytes streamed)."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()

        gone = threading.Event()  # the client went away: stop at the next step

        def on_step(k: int, loss: torch.Tensor) -> None:  # on the device thread
            if gone.is_set():
                raise ClientGone  # ends the launch; its job's future is already cancelled
            row = codec.tensor_to_bytes(loss, dtype)
            loop.call_soon_threadsafe(steps.put_nowait, (k, bytes(row)))

        job.on_step = on_step
        launch = asyncio.ensure_future(self.batcher.submit(job, engine, plan.payload_bytes))
        sent = 0

        async def send(k: int, row: bytes) -> None:
            nonlocal prefix, sent
            await context.write(prefix + wire.encode_chunk("losses", k * len(row), row))
            prefix, sent = b"", sent + len(row)

        try:
            while not launch.done():
                next_step = asyncio.ensure_future(steps.get())
                await asyncio.wait(
                    {next_step, launch},
                    timeout=self.config.heartbeat_s or None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if next_step.done():
                    await send(*next_step.result())
                    continue
                next_step.cancel()
                if not launch.done():  # a silent interval: queued, or a long step
                    await context.write(prefix or HEARTBEAT)
                    prefix = b""
            launched = launch.result()  # raises the launch's error
            while not steps.empty():
                await send(*steps.get_nowait())
        finally:
            gone.set()
            launch.cancel()  # the client went away: leave the queue, or stop the steps
        if prefix:  # no step reported (cannot happen with steps >= 1): still accept
            await context.write(prefix)
        return launched, sent

    async def _send_results(
        self, context, plan: JobPlan, descriptors, result, summary, prefix: bytes, streamed: int = 0
    ) -> int:
        """Stream the result tensors in order, then the summary. The loss goes out first, as
        soon as the launch is done; each next tensor is serialised (device -> host, wire
        dtype) while the previous one is being sent. Chunks of small tensors share a message
        (up to the chunk size), and the summary rides with the last one, so a small job's
        results are one message. A slow reader holds the stream at `write`, so at most two
        serialised tensors exist at a time. `prefix` (a deferred accepted message) goes
        first, in the same message as the first chunks. `streamed`: result bytes already
        sent (for the summary's count)."""
        tensors = result_tensors(plan, result)
        del result
        budget = plan.response_chunk_bytes

        def serialise(d):
            tensor = tensors.pop(d.name)
            nbytes = tensor.numel() * tensor.element_size()
            return self._io(nbytes, codec.tensor_to_bytes, tensor, d.dtype, d.name)

        sent, packer = 0, ChunkPacker(context.write, budget, prefix)
        upcoming = serialise(descriptors[0])
        for i, d in enumerate(descriptors):
            data = await upcoming
            if i + 1 < len(descriptors):
                upcoming = serialise(descriptors[i + 1])
            for offset in range(0, len(data), budget):
                await packer.add(d.name, offset, data[offset : offset + budget])
            sent += len(data)
            del data
        await packer.flush(summary(streamed + sent).SerializeToString())
        return sent
