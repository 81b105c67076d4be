"""GradientService: the Compute stream (header -> chunks -> results) and GetServerInfo."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import torch

import gradserve
from gradserve import kernels
from gradserve.kernels import EngineUnavailable, EnsembleResult
from gradserve.server import codec
from gradserve.server.admission import Admission
from gradserve.server.assembly import PayloadAssembler
from gradserve.server.config import ServerConfig
from gradserve.server.errors import JobError, invalid, too_large, unsupported
from gradserve.server.validation import (
    ACTIVATION_NAMES,
    LOSS_NAMES,
    PRECISION_NAMES,
    JobPlan,
    validate_header,
)
from gradserve.server.worker import DeviceWorker
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import wire

log = logging.getLogger("gradserve.server")


def encode_results(plan: JobPlan, result: EnsembleResult) -> list[tuple[str, memoryview]]:
    """Result tensors as wire bytes, in the order of plan.result_descriptors()."""
    by_name: dict[str, torch.Tensor] = {"loss": result.loss}
    if result.per_sample_loss is not None:
        by_name["per_sample_loss"] = result.per_sample_loss
    if result.outputs is not None:
        by_name["outputs"] = result.outputs
    for i in range(plan.mlp.num_layers):
        if result.weight_grads is not None:
            by_name[f"layers.{i}.weight.grad"] = result.weight_grads[i]
            by_name[f"layers.{i}.bias.grad"] = result.bias_grads[i]
    if result.input_grads is not None:
        by_name["inputs.grad"] = result.input_grads
    return [
        (d.name, codec.tensor_to_bytes(by_name[d.name], d.dtype)) for d in plan.result_descriptors()
    ]


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
        self.device = device
        self.worker = DeviceWorker(device)
        self.admission = Admission(config.max_inflight_bytes)

    async def GetServerInfo(self, request, context):
        engines = [
            pb.EngineInfo(
                name=name,
                device=str(self.device),
                precisions=[k for k, v in PRECISION_NAMES.items() if v in precisions and k != 0],
            )
            for name, precisions in kernels.available_engines(self.device).items()
        ]
        c = self.config
        return pb.GetServerInfoResponse(
            version=gradserve.__version__,
            engines=engines,
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
            ),
        )

    async def _read(self, context) -> pb.ComputeRequest | None:
        """Next request message, None at the end of the stream."""
        try:
            msg = await asyncio.wait_for(context.read(), self.config.upload_idle_timeout_s)
        except asyncio.TimeoutError:
            raise JobError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no request message for {self.config.upload_idle_timeout_s} s",
            ) from None
        return None if msg is grpc.aio.EOF else msg

    async def Compute(self, request_iterator, context):
        job_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        outcome, info = "error", {}
        try:
            await self._compute(job_id, context, info)
            outcome = "ok"
        except JobError as e:
            outcome = e.code.name
            log.info(
                "job=%s peer=%s outcome=%s message=%s", job_id, context.peer(), outcome, e.message
            )
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        finally:
            if outcome in ("ok", "CANCELLED"):
                log.info(
                    "job=%s peer=%s outcome=%s seconds=%.4f %s",
                    job_id,
                    context.peer(),
                    outcome,
                    time.perf_counter() - started,
                    " ".join(f"{k}={v}" for k, v in info.items()),
                )

    async def _compute(self, job_id: str, context, info: dict) -> None:
        header_at = time.perf_counter()
        first = await self._read(context)
        if first is None:
            raise invalid("request stream ended before the job header")
        if first.WhichOneof("payload") == "malformed":
            raise invalid("request message is not a valid ComputeRequest")
        if first.WhichOneof("payload") != "header":
            raise invalid("the first request message must be a header")
        plan = validate_header(first.header, self.config)
        try:
            engine = kernels.select_engine(plan.backend, plan.precision, self.device)
        except EngineUnavailable as e:
            raise unsupported(str(e)) from None
        info.update(
            engine=engine,
            M=plan.num_models,
            N=plan.num_samples,
            layers=list(plan.mlp.layer_sizes),
            tag=plan.client_tag,
        )

        with self.admission.reserve(plan.payload_bytes):
            descriptors = plan.result_descriptors()
            accepted = pb.JobAccepted(
                job_id=job_id, engine=engine, device=str(self.device), results=descriptors
            )
            await context.write(pb.ComputeResponse(accepted=accepted))

            assembler = PayloadAssembler(plan)
            while (msg := await self._read(context)) is not None:
                kind = msg.WhichOneof("payload")
                if kind == "chunk":
                    assembler.add(msg.chunk)
                elif kind == "header":
                    raise invalid("a job has exactly one header")
                elif kind == "malformed":
                    raise invalid("request message is not a valid ComputeRequest")
                else:
                    raise invalid("request message carries neither header nor chunk")
            job = await self.worker.call(assembler.finish)
            del assembler  # the job's tensors are views of its buffers
            uploaded = time.perf_counter()

            try:
                done = await self.worker.run(job, engine, lambda r: encode_results(plan, r))
            except torch.OutOfMemoryError:
                raise too_large("the device ran out of memory for this job") from None
            del job

            sent = 0
            for name, data in done.encoded:
                for chunk in codec.encoded_chunks(name, data, plan.response_chunk_bytes):
                    await context.write(chunk)
                sent += len(data)
            finished = time.perf_counter()
            summary = pb.JobSummary(
                timings=pb.Timings(
                    upload_seconds=uploaded - header_at,
                    queue_seconds=done.queue_seconds,
                    compute_seconds=done.compute_seconds,
                    download_seconds=finished
                    - uploaded
                    - done.queue_seconds
                    - done.compute_seconds,
                ),
                flops=kernels.flops(plan.mlp, plan.num_models, plan.num_samples),
                bytes_received=plan.payload_bytes,
                bytes_sent=sent,
                jobs_in_launch=1,
                models_in_launch=plan.num_models,
            )
            await context.write(pb.ComputeResponse(summary=summary))
            info.update(
                bytes_in=plan.payload_bytes,
                bytes_out=sent,
                compute_s=round(done.compute_seconds, 4),
            )
