"""Dynamic batching: concurrent jobs that can share an engine launch are concatenated along
the model axis M, run once, and split back per job.

Jobs share a launch when they have the same batch key: engine, architecture, loss, requested
outputs, precision, sample count N, shared-or-per-model inputs, the presence of sample
weights and the DP clipping settings (a job with DP noise, or with optimiser steps,
launches alone). Shared tensors ([N, ...]) are expanded per model when jobs are merged.

Policy (in the spirit of Triton Inference Server's dynamic batcher): one launch at a time
per device. When the engine is free, the oldest waiting job's key is served: its batch
launches as soon as it is full (max_jobs, max_models or max_bytes) or the oldest job has
waited max_delay, or at once when every job the server holds waits in the queue: no
caller is busy with the server, and a lone caller's job would only wait (such a wait was
half the time of a small job's round trip). Jobs arriving while a launch runs simply
queue, so under load batches grow without any added delay. A job cancelled while queued
leaves the queue at once; one cancelled during a launch is computed with the others and
its results dropped. A batch whose launch runs out of memory is launched again job by job,
so that a job that fits by itself is not refused for its batch-mates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field

import torch

from gradserve import kernels
from gradserve.kernels import EnsembleJob, EnsembleResult
from gradserve.server.errors import out_of_memory
from gradserve.server.worker import DeviceWorker


@dataclass(frozen=True)
class BatchingPolicy:
    max_delay_s: float = 0.002
    max_jobs: int = 256
    max_models: int = 65536
    max_bytes: int = 256 << 20


@dataclass
class Launched:
    """What a job gets back from its launch."""

    result: EnsembleResult  # this job's slice of the launch's results, on the device
    jobs_in_launch: int
    models_in_launch: int
    launch_flops: int
    queue_seconds: float
    compute_seconds: float


@dataclass
class _Waiting:
    key: tuple
    job: EnsembleJob
    engine: str
    payload_bytes: int
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)


def batch_key(job: EnsembleJob, engine: str) -> tuple:
    # Noise is drawn for a launch's whole shape, so a noisy DP job launches alone; so does a
    # training job (its losses stream per step).
    noisy = job.privacy is not None and job.privacy.noise_multiplier > 0
    alone = id(job) if noisy or job.optimizer is not None else None
    return (
        alone,
        job.privacy,
        engine,
        job.mlp,
        job.loss,
        job.outputs,
        job.precision,
        job.num_samples,
        job.shared_inputs,
        job.sample_weights is not None,
    )


def _per_model(t: torch.Tensor, m: int, per_model_dims: int) -> torch.Tensor:
    """A tensor in its per-model form [M, ...]: shared ones are expanded (a view)."""
    return t if t.dim() == per_model_dims else t.unsqueeze(0).expand(m, *t.shape)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat on one device: a streamed job stepping on each micro-batch brings its
    parameters on the engine's device, other jobs theirs from the wire, on the host."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), None)
    if device is not None:
        tensors = [t.to(device) for t in tensors]
    return torch.cat(tensors)


def merge(jobs: list[EnsembleJob]) -> EnsembleJob:
    """Concatenate jobs of one batch key along the model axis."""
    if len(jobs) == 1:
        return jobs[0]
    first = jobs[0]
    target_dims = 2 if first.loss.name == "cross_entropy" else 3

    def cat(get, per_model_dims):
        return _cat([_per_model(get(j), j.num_models, per_model_dims) for j in jobs])

    layers = range(first.mlp.num_layers)
    return EnsembleJob(
        mlp=first.mlp,
        loss=first.loss,
        weights=[_cat([j.weights[i] for j in jobs]) for i in layers],
        biases=[_cat([j.biases[i] for j in jobs]) for i in layers],
        inputs=cat(lambda j: j.inputs, 3),
        targets=cat(lambda j: j.targets, target_dims),
        sample_weights=None if first.sample_weights is None else cat(lambda j: j.sample_weights, 2),
        precision=first.precision,
        outputs=first.outputs,
        privacy=first.privacy,
    )


def split(result: EnsembleResult, sizes: list[int]) -> list[EnsembleResult]:
    """Cut a launch's results back into per-job results (views, no copies)."""
    if len(sizes) == 1:
        return [result]

    def parts(t):
        return [None] * len(sizes) if t is None else list(torch.split(t, sizes))

    def parts_list(ts):
        if ts is None:
            return [None] * len(sizes)
        return [list(p) for p in zip(*(torch.split(t, sizes) for t in ts), strict=True)]

    return [
        EnsembleResult(loss=loss, weight_grads=w, bias_grads=b, input_grads=dx,
                       per_sample_loss=per, per_sample_grad_norm=norm, outputs=y,
                       engine=result.engine, device=result.device)
        for loss, w, b, dx, per, norm, y in zip(
            parts(result.loss), parts_list(result.weight_grads), parts_list(result.bias_grads),
            parts(result.input_grads), parts(result.per_sample_loss),
            parts(result.per_sample_grad_norm), parts(result.outputs), strict=True,
        )
    ]  # fmt: skip


class DynamicBatcher:
    def __init__(self, worker: DeviceWorker, policy: BatchingPolicy, on_launch=None):
        self.worker = worker
        self.policy = policy
        # on_launch(engine, device, jobs, models, flops), after every successful launch
        self.on_launch = on_launch
        self.queue: collections.deque[_Waiting] = collections.deque()
        self._arrived = asyncio.Event()  # a job was queued, or one the server held ended
        self._held = 0  # jobs the server holds, from admission to their end (holding())
        self._task: asyncio.Task | None = None
        self.launches = 0
        self.launched_jobs = 0
        self.launched_models = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def holding(self):
        """Around a job's life in the server, from its admission to its end: while a job is
        held outside the queue (uploading, or receiving its results: its caller may send
        more), the idle engine holds a batch for up to max_delay for others to join."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if self._all_held_queued():  # nothing else could join: launch what waits now
                self._arrived.set()

    def _all_held_queued(self) -> bool:
        """Every job the server holds waits in the queue (with none held, jobs submitted
        directly, as by a library caller, always get the wait)."""
        return 0 < self._held <= len(self.queue)

    @property
    def queued_jobs(self) -> int:
        return len(self.queue)

    async def submit(self, job: EnsembleJob, engine: str, payload_bytes: int) -> Launched:
        waiting = _Waiting(
            batch_key(job, engine),
            job,
            engine,
            payload_bytes,
            asyncio.get_running_loop().create_future(),
        )
        self.queue.append(waiting)
        self._arrived.set()
        try:
            return await waiting.future
        except asyncio.CancelledError:
            # Cancelled or past its deadline: leave the queue now, freeing the job's tensors.
            with contextlib.suppress(ValueError):
                self.queue.remove(waiting)
            raise

    def _next_batch(self) -> tuple[list[_Waiting], bool]:
        """The oldest job's batch-mates in arrival order, and whether the batch is full."""
        oldest = self.queue[0]
        batch, models, nbytes = [], 0, 0
        p = self.policy
        for w in self.queue:
            if w.key != oldest.key:
                continue
            m = w.job.num_models
            if batch and (models + m > p.max_models or nbytes + w.payload_bytes > p.max_bytes):
                return batch, True
            batch.append(w)
            models += m
            nbytes += w.payload_bytes
            if len(batch) >= p.max_jobs:
                return batch, True
        return batch, False

    async def _serve(self) -> None:
        while True:
            if not self.queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch, full = self._next_batch()
            wait = batch[0].enqueued_at + self.policy.max_delay_s - time.perf_counter()
            if not full and wait > 0 and not self._all_held_queued():
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), wait)
                continue
            for w in batch:
                self.queue.remove(w)
            await self._launch(batch)

    async def _launch(self, batch: list[_Waiting]) -> None:
        live = [w for w in batch if not w.future.done()]
        if not live:
            return
        sizes = [w.job.num_models for w in live]
        launch_at = time.perf_counter()
        total_models = sum(sizes)
        first = live[0].job
        steps = first.optimizer.steps if first.optimizer is not None else 1
        flops = kernels.flops(first.mlp, total_models, first.num_samples) * steps

        def work(jobs: list[EnsembleJob]) -> tuple[list[EnsembleResult], float]:
            started = time.perf_counter()
            with self.worker.threads_for(flops / steps):
                result = kernels.run(merge(jobs), live[0].engine, self.worker.device)
            if self.worker.device.type == "cuda":
                torch.cuda.synchronize(self.worker.device)
            return split(result, sizes), time.perf_counter() - started

        try:
            parts, seconds = await self.worker.call(work, [w.job for w in live])
        except Exception as e:
            if len(live) > 1 and out_of_memory(e):
                # Together they did not fit; each alone may: run them one by one.
                for w in live:
                    await self._launch([w])
                return
            for w in live:  # the engine failed: every job of the launch gets the error
                if not w.future.done():
                    w.future.set_exception(e)
            return
        self.launches += 1
        self.launched_jobs += len(live)
        self.launched_models += total_models
        if self.on_launch is not None:
            self.on_launch(live[0].engine, str(self.worker.device), len(live), total_models, flops)
        for w, part in zip(live, parts, strict=True):
            if not w.future.done():
                w.future.set_result(
                    Launched(part, len(live), total_models, flops,
                             launch_at - w.enqueued_at, seconds)
                )  # fmt: skip
            w.job = None  # drop the inputs as soon as possible
