"""Reassembles a job's tensors from its request chunks, then checks their values.

Each tensor has one buffer of exactly its declared size. Its chunks must arrive in order
and back to back, so a duplicate, overlapping, out-of-order or out-of-range chunk is
caught by one comparison and nothing is ever written past a buffer's end.
"""

from __future__ import annotations

import numpy as np
import torch

from gradserve.kernels import EnsembleJob
from gradserve.server import codec
from gradserve.server.errors import invalid
from gradserve.server.validation import JobPlan
from gradserve.v1 import gradserve_pb2 as pb


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf. A sum propagates both (NaN stays NaN, Inf + -Inf is NaN), so a finite
    sum proves every element finite: one allocation-free pass, 1.5 ms against 47 ms for
    torch.isfinite(t).all() on 64 MiB of float32 here. Only a non-finite sum (a real NaN/Inf
    or an overflow of large finite values) needs the exact elementwise check. Small tensors
    go through numpy, whose per-call overhead is a fraction of torch's."""
    if tensor.numel() <= SMALL_TENSOR and tensor.dtype != torch.bfloat16:
        return bool(np.isfinite(tensor.numpy()).all())
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


# Elements up to which per-call overhead, not memory bandwidth, dominates a check.
SMALL_TENSOR = 1 << 16


class PayloadAssembler:
    def __init__(self, plan: JobPlan):
        self.plan = plan
        # np.empty, not bytearray: no zero-filling of memory that is overwritten anyway
        # (a 64 MiB bytearray costs ~30 ms here).
        self.buffers = {
            name: np.empty(t.nbytes, dtype=np.uint8) for name, t in plan.tensors.items()
        }
        self._views = {name: memoryview(b) for name, b in self.buffers.items()}
        self.received = dict.fromkeys(plan.tensors, 0)

    def add(self, chunk: pb.TensorChunk) -> None:
        name = chunk.name
        if name not in self.buffers:
            raise invalid(f"chunk for undeclared tensor {name!r}", f"chunks[{name}]")
        size = len(self.buffers[name])
        expected = self.received[name]
        if chunk.offset != expected:
            raise invalid(
                f"chunk of {name!r} at offset {chunk.offset}; expected offset {expected} "
                "(chunks of a tensor must be in order, without gaps or overlaps)",
                f"chunks[{name}].offset",
            )
        length = len(chunk.data)
        if length == 0:
            raise invalid(f"empty chunk for {name!r}", f"chunks[{name}].data")
        if expected + length > size:
            raise invalid(
                f"chunk of {name!r} ends at byte {expected + length}, beyond its {size} bytes",
                f"chunks[{name}].data",
            )
        self._views[name][expected : expected + length] = chunk.data
        self.received[name] = expected + length

    def missing(self) -> list[str]:
        return [n for n, got in self.received.items() if got != self.plan.tensors[n].nbytes]

    def finish(self) -> EnsembleJob:
        """All bytes are in: build the engine job (zero-copy views) and check the values."""
        missing = self.missing()
        if missing:
            detail = ", ".join(
                f"{n} ({self.received[n]} of {len(self.buffers[n])} bytes)" for n in missing
            )
            raise invalid(f"request stream ended before all tensor bytes arrived: {detail}")
        plan = self.plan
        t = {
            name: codec.tensor_from_bytes(self.buffers[name], spec.dtype, spec.shape)
            for name, spec in plan.tensors.items()
        }
        if not plan.allow_non_finite:
            for name, tensor in t.items():
                if tensor.is_floating_point() and not all_finite(tensor):
                    raise invalid(
                        f"tensor {name!r} contains NaN or Inf (set allow_non_finite to accept)",
                        f"tensors[{name}]",
                    )
        if plan.loss.name == "cross_entropy":
            classes = plan.mlp.layer_sizes[-1]
            targets = t["targets"]
            if int(targets.min()) < 0 or int(targets.max()) >= classes:
                raise invalid(
                    f"cross_entropy targets must be class indices in [0, {classes}); got "
                    f"values in [{int(targets.min())}, {int(targets.max())}]",
                    "tensors[targets]",
                )
        num_layers = plan.mlp.num_layers
        return EnsembleJob(
            mlp=plan.mlp,
            loss=plan.loss,
            weights=[t[f"layers.{i}.weight"] for i in range(num_layers)],
            biases=[t[f"layers.{i}.bias"] for i in range(num_layers)],
            inputs=t["inputs"],
            targets=t["targets"],
            sample_weights=t.get("sample_weights"),
            precision=plan.precision,
            outputs=plan.outputs,
            privacy=plan.privacy,
            optimizer=plan.optimizer,
            optimizer_state={name: t[name] for name in plan.optimizer_state_names() if name in t},
        )
