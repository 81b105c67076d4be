"""Streamed jobs: N beyond what the server should hold at once.

The parameters arrive first and are kept whole. The sample tensors (inputs, targets,
sample_weights) then arrive interleaved; as soon as every one of them holds the next
micro-batch's rows, those rows become an engine job of their own (sum reduction) and leave
the buffers. A sample tensor given per model ([M, N, ...]) is M runs of rows, one per model,
each arriving in order like a tensor of its own ("lanes"; a shared tensor is one lane). The
micro-batches are blocks of samples as kernels/sample_blocks.py defines them: the caller
runs their jobs, adds their losses and gradients in float64 (sample_blocks.add()) and sends
their per-sample results as they come (per_sample_rows()); finish() then applies the job's
reduction, which gives the one-shot result up to float rounding, and takes the job's
optimiser step, if it has one: one step on all the samples, as each further one would need
every sample again. A job may instead take a step on each micro-batch (MicroBatchSteps):
then each micro-batch is a job of its own.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import torch

from gradserve.kernels import EnsembleJob, EnsembleResult, optimizers, sample_blocks
from gradserve.kernels.spec import compute_dtype
from gradserve.server import codec
from gradserve.server.assembly import (
    PayloadAssembler,
    check_values,
    engine_job,
    optimizer_state,
    parameters,
)
from gradserve.server.errors import invalid
from gradserve.server.validation import PER_SAMPLE_FIELDS, JobPlan


class SampleStream:
    def __init__(self, plan: JobPlan):
        self.plan = plan
        self.samples = plan.sample_tensors
        self.params = PayloadAssembler(plan, [n for n in plan.tensors if n not in self.samples])
        per_model = plan.per_model_samples
        self.lanes = {n: plan.num_models if n in per_model else 1 for n in self.samples}
        self.lane_bytes = {n: plan.tensors[n].nbytes // self.lanes[n] for n in self.samples}
        self.row_bytes = {n: self.lane_bytes[n] // plan.num_samples for n in self.samples}
        self.pending = {n: [bytearray() for _ in range(self.lanes[n])] for n in self.samples}
        self.received = {n: [0] * self.lanes[n] for n in self.samples}
        batch = min(plan.micro_batch_samples, plan.num_samples)
        # Each lane may hold two micro-batches of rows beyond those cut: a shared tensor's
        # plus the chunk that crosses that mark, a per-model tensor's with its chunks counted
        # (its M lanes would otherwise hold M chunks more).
        self.limit = {n: 2 * batch * r for n, r in self.row_bytes.items()}
        self.next_sample = 0  # first sample of the next micro-batch
        # Bytes each lane of a tensor must hold for the next micro-batch to be cut.
        self.need = self._need()
        # Lanes holding the next micro-batch's rows: it is cut when all of them do.
        self.filled = 0
        # Every parameter byte is in (checked once it is, not for every sample chunk).
        self.params_complete = False
        self.total_lanes = sum(self.lanes.values())
        # Micro-batches cut from the buffers as soon as complete (one request message may
        # carry several), waiting to be launched: (first sample, engine job).
        self.ready: collections.deque[tuple[int, EnsembleJob]] = collections.deque()
        self._parameters: dict[str, torch.Tensor] | None = None

    def add(self, chunk) -> None:
        name = chunk.name
        if name not in self.pending:
            self.params.add(chunk)  # parameters, or an undeclared name (INVALID_ARGUMENT)
            return
        if not self.params_complete:
            if self.params.missing():
                raise invalid(
                    "in a streamed job every parameter byte must arrive before the first "
                    f"sample byte; got a chunk of {name!r} while {self.params.missing()} are "
                    "incomplete",
                    f"chunks[{name}]",
                )
            self.params_complete = True
        data = chunk.data
        lane, length = self._lane_of(name, chunk.offset, len(data)), len(data)
        pending = self.pending[name][lane]
        per_model = self.lanes[name] > 1
        ahead = len(pending) + (length if per_model else 0)
        if ahead > self.limit[name]:
            if per_model:
                raise invalid(
                    f"model {lane}'s rows of {name!r} would run more than two micro-batches "
                    "ahead of the other models' and sample tensors' rows; send each "
                    "micro-batch's rows model by model, in chunks of at most a micro-batch",
                    f"chunks[{name}]",
                )
            raise invalid(
                f"{name!r} ran more than two micro-batches ahead of the other sample tensors; "
                "interleave their chunks micro-batch by micro-batch",
                f"chunks[{name}]",
            )
        need = self.need[name]
        was_filled = len(pending) >= need
        pending += data
        self.received[name][lane] += length
        if not was_filled and len(pending) >= need:
            self.filled += 1
            while self.filled == self.total_lanes and self.next_sample < self.plan.num_samples:
                self.ready.append(self._next_micro_batch())

    def _lane_of(self, name: str, offset: int, length: int) -> int:
        """The lane a chunk continues; refused (INVALID_ARGUMENT) where it does not start
        where that lane's bytes left off, is empty, or runs beyond the lane."""
        span, lanes = self.lane_bytes[name], self.lanes[name]
        lane = min(max(offset, 0) // span, lanes - 1)
        start = lane * span
        expected = start + self.received[name][lane]
        if offset != expected:
            rule = "(chunks of a tensor must be in order, without gaps)"
            if lanes > 1:
                rule = (f"where model {lane}'s rows go on (each model's rows of a per-model "
                        "sample tensor arrive in order, without gaps)")  # fmt: skip
            raise invalid(
                f"chunk of {name!r} at offset {offset}; expected offset {expected} {rule}",
                f"chunks[{name}].offset",
            )
        if length == 0:
            raise invalid(f"empty chunk for {name!r}", f"chunks[{name}].data")
        if offset + length > start + span:
            beyond = f"beyond its {span} bytes"
            if lanes > 1:
                beyond = (f"beyond model {lane}'s rows (bytes {start} to {start + span}); a "
                          "chunk of a per-model sample tensor holds one model's rows")  # fmt: skip
            raise invalid(
                f"chunk of {name!r} ends at byte {offset + length}, {beyond}",
                f"chunks[{name}].data",
            )
        return lane

    def _count(self) -> int:
        """Samples in the next micro-batch."""
        return min(self.plan.micro_batch_samples, self.plan.num_samples - self.next_sample)

    def _need(self) -> dict[str, int]:
        """Bytes each lane of a tensor must hold for the next micro-batch to be cut."""
        count = max(self._count(), 1)
        return {name: count * row for name, row in self.row_bytes.items()}

    def parameters(self) -> dict[str, torch.Tensor]:
        if self._parameters is None:
            self._parameters = self.params.tensors()
        return self._parameters

    def _next_micro_batch(self) -> tuple[int, EnsembleJob]:
        """The next micro-batch, all of whose rows have arrived, cut from the buffers: (its
        first sample, its engine job)."""
        plan = self.plan
        count = self._count()
        rows = {}
        for name, row in self.row_bytes.items():
            size, lanes = count * row, self.pending[name]
            buffer = np.empty((len(lanes), size), dtype=np.uint8)
            for lane, pending in enumerate(lanes):
                buffer[lane] = memoryview(pending)[:size]
                del pending[:size]
            spec = plan.tensors[name]
            if name in plan.per_model_samples:  # [M, N, ...]; M may be 1
                shape = (len(lanes), count, *spec.shape[2:])
            else:
                shape = (count, *spec.shape[1:])
            rows[name] = codec.tensor_from_bytes(buffer.reshape(-1), spec.dtype, shape)
        check_values(rows, plan)
        start = self.next_sample
        self.next_sample += count
        self.need = self._need()
        self.filled = sum(
            len(p) >= self.need[n] for n, lanes in self.pending.items() for p in lanes
        )
        gradients = plan.outputs.parameter_gradients or plan.optimizer is not None
        if plan.steps_per_micro_batch:  # a job of its own: MicroBatchSteps.job() completes it
            loss, dp = plan.loss, None
        else:  # a block of the job's sums
            loss, dp = sample_blocks.block_loss(plan), sample_blocks.block_privacy(plan)
        return start, engine_job(
            plan,
            {**self.parameters(), **rows},
            loss=loss,
            outputs=dataclasses.replace(plan.outputs, parameter_gradients=gradients),
            privacy=dp,
            optimizer=None,  # the job's steps come after its micro-batches run
            optimizer_state={},
        )

    def missing(self) -> str:
        """What has not arrived, for the error when the request stream ends early."""
        incomplete = [
            f"{n} ({sum(got)} of {self.plan.tensors[n].nbytes} bytes)"
            for n, got in self.received.items()
            if sum(got) != self.plan.tensors[n].nbytes
        ]
        return ", ".join(self.params.missing() + incomplete)

    @property
    def done(self) -> bool:
        return self.next_sample == self.plan.num_samples

    def micro_batch_bytes(self) -> int:
        batch = min(self.plan.micro_batch_samples, self.plan.num_samples)
        return sum(batch * r * self.lanes[n] for n, r in self.row_bytes.items())


class MicroBatchSteps:
    """The optimiser steps of a job that takes one on each micro-batch
    (JobPlan.steps_per_micro_batch), as a torch training loop over a DataLoader would: a
    micro-batch runs with the parameters the steps before it left, its loss and gradients
    are its own samples' under the job's reduction (with DP-SGD, fresh noise at each step,
    as a one-shot job's steps get), and they take the next step. Made, and stepped, on the
    device's thread."""

    def __init__(self, plan: JobPlan, tensors: dict[str, torch.Tensor], device):
        weights, biases = parameters(plan, tensors)
        self.plan = plan
        self.steps = optimizers.Steps(plan.optimizer, plan.mlp.num_layers, weights, biases,
                                      optimizer_state(plan, tensors),
                                      compute_dtype(plan.precision), device)  # fmt: skip

    def job(self, micro: EnsembleJob, k: int) -> EnsembleJob:
        """Micro-batch k's engine job, on the parameters as steps 0..k-1 left them."""
        privacy = optimizers.step_privacy(self.plan.privacy, k)
        return dataclasses.replace(
            micro, weights=self.steps.weights, biases=self.steps.biases, privacy=privacy
        )

    def take(self, k: int, result: EnsembleResult, dtype: int) -> bytes:
        """Step k by micro-batch k's gradients; its losses [M] as wire bytes of `dtype`."""
        self.steps.take(k, result)
        return bytes(codec.tensor_to_bytes(result.loss, dtype))

    def result(self, engine: str) -> EnsembleResult:
        result = self.steps.result()
        result.engine = engine
        return result


def per_sample_rows(part: EnsembleResult, plan: JobPlan) -> dict[str, torch.Tensor]:
    """A micro-batch's per-sample results ([M, n, ...]) by wire name, final
    (sample_blocks.rows())."""
    return {PER_SAMPLE_FIELDS[name]: t for name, t in sample_blocks.rows(part, plan).items()}


def finish(total: EnsembleResult, plan: JobPlan, tensors: dict[str, torch.Tensor], device):
    """The job's result from its micro-batches' sums: sample_blocks.reduce(), then for a job
    with an optimiser its one step (the full-batch gradient over every sample, as a one-shot
    job's first step) of the parameters and optimiser state in `tensors`, by wire name."""
    result = sample_blocks.reduce(total, plan, device)
    if plan.optimizer is None:
        return result
    weights, biases = parameters(plan, tensors)
    steps = optimizers.Steps(plan.optimizer, plan.mlp.num_layers, weights, biases,
                             optimizer_state(plan, tensors), result.loss.dtype,
                             device)  # fmt: skip
    steps.take(0, result)
    stepped = steps.result()
    stepped.engine = result.engine
    return stepped
