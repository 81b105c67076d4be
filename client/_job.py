"""One job on the wire: the request messages it is sent as, and the reassembly of the
response stream into result tensors. Shared by the sync and asyncio clients."""

from __future__ import annotations

import math
import mmap
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from gradserve.client._errors import GradserveError
from gradserve.client._models import Ensemble, as_array
from gradserve.client._tensors import (
    DATA_TYPE_BY_NAME,
    NUMPY_DTYPES,
    accelerator_of,
    check_floating,
    dtype_name,
    float64_as_float32,
    from_wire,
    is_torch,
    to_wire,
    whole_as_floats,
)
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import wire
from gradserve.v1.shapes import PER_SAMPLE_RESULTS, is_per_model

DEFAULT_CHUNK_BYTES = 1 << 20

ACTIVATIONS = {
    "identity": pb.ACTIVATION_KIND_IDENTITY,
    "relu": pb.ACTIVATION_KIND_RELU,
    "leaky_relu": pb.ACTIVATION_KIND_LEAKY_RELU,
    "tanh": pb.ACTIVATION_KIND_TANH,
    "sigmoid": pb.ACTIVATION_KIND_SIGMOID,
    "gelu": pb.ACTIVATION_KIND_GELU,
    "silu": pb.ACTIVATION_KIND_SILU,
    "softplus": pb.ACTIVATION_KIND_SOFTPLUS,
}
LOSSES = {
    "mse": pb.LOSS_KIND_MSE,
    "l1": pb.LOSS_KIND_L1,
    "huber": pb.LOSS_KIND_HUBER,
    "bce_with_logits": pb.LOSS_KIND_BCE_WITH_LOGITS,
    "cross_entropy": pb.LOSS_KIND_CROSS_ENTROPY,
}
REDUCTIONS = {"mean": pb.REDUCTION_MEAN, "sum": pb.REDUCTION_SUM}
PRECISIONS = {
    "float32": pb.PRECISION_FLOAT32,
    "tf32": pb.PRECISION_TF32,
    "bfloat16": pb.PRECISION_BFLOAT16,
    "float16": pb.PRECISION_FLOAT16,
    "float64": pb.PRECISION_FLOAT64,
}
BACKENDS = {"auto": pb.BACKEND_AUTO, "torch": pb.BACKEND_TORCH, "triton": pb.BACKEND_TRITON}
OPTIMIZERS = {
    "sgd": pb.OPTIMIZER_KIND_SGD,
    "adam": pb.OPTIMIZER_KIND_ADAM,
    "adamw": pb.OPTIMIZER_KIND_ADAMW,
}


def _choice(table: dict, value: str, what: str) -> int:
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(table)}")
    return table[value]


def _activation(spec: str | tuple[str, float]) -> pb.Activation:
    if isinstance(spec, str):
        name, slope = spec, 0.0
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and _real_number(spec[1]):
        name, slope = spec
    else:
        raise TypeError(f"an activation is a name or (name, negative_slope), got {spec!r}")
    if name == "leaky_relu" and slope == 0:
        # On the wire a slope of 0 means "the default, 0.01"; leaky_relu with slope 0 is relu
        # exactly (values, and the derivative 0 at 0), so it goes as relu.
        name = "relu"
    return pb.Activation(kind=_choice(ACTIVATIONS, name, "activation"), negative_slope=slope)


@dataclass
class JobOptions:
    loss: str = "mse"
    reduction: str = "mean"
    huber_delta: float = 1.0
    hidden_activation: str | tuple[str, float] | None = None
    output_activation: str | tuple[str, float] | None = None
    negative_slope: float = 0.01
    precision: str = "float32"
    backend: str = "auto"
    parameter_gradients: bool = True
    input_gradients: bool = False
    per_sample_losses: bool = False
    per_sample_gradient_norms: bool = False
    forward_outputs: bool = False
    gradient_dtype: str | None = None
    allow_non_finite: bool = False
    tag: str = ""
    # DP-SGD (gradserve.v1.PrivacyOptions): clip per-sample gradients to this norm...
    clip_norm: float | None = None
    # ...and add noise of standard deviation noise_multiplier * clip_norm, seeded.
    noise_multiplier: float = 0.0
    noise_seed: int | None = None
    # Server-side training (gradserve.v1.OptimizerOptions): "sgd", "adam" or "adamw"...
    optimizer: str | None = None
    # Full-batch steps; a streamed job (micro_batch_samples) takes 1, or one on each
    # micro-batch when this is their number.
    steps: int = 1
    learning_rate: float | None = None
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None  # None: torch's default (0.01 for adamw, else 0)
    betas: tuple[float, float] | None = None
    eps: float | None = None
    # ...continuing from a previous result's optimizer_state, which has taken start_step steps.
    optimizer_state: dict[str, Any] | None = None
    start_step: int = 0
    return_optimizer_state: bool = False
    # Called as on_step(step, losses [M]) as each step's losses arrive (for a single
    # nn.Sequential the loss alone, as ComputeResult.losses has no model axis for it).
    on_step: Callable[[int, Any], None] | None = None
    # Called as on_progress(phase, done_bytes, total_bytes) as tensor bytes are handed to
    # gRPC ("upload") and as result bytes arrive ("download"); a retried job starts again.
    on_progress: Callable[[str, int, int], None] | None = None
    # > 0: stream the samples in micro-batches of this many, for N too large for the server
    # to hold at once; the result equals the one-shot one up to float rounding.
    micro_batch_samples: int = 0


@dataclass
class WireJob:
    header: pb.JobHeader
    payloads: list[tuple[str, memoryview]]
    ensemble: Ensemble
    as_torch: bool
    on_step: Callable[[int, Any], None] | None = None
    on_progress: Callable[[str, int, int], None] | None = None
    # Where torch results go: the caller's parameters' device when not the CPU.
    device: Any = None
    # Optimiser steps already handed to on_step, over all attempts: a retried job trains
    # from its first step again, and on_step hears only of the steps past these.
    steps_handed: int = 0

    def requests(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Serialized request messages: the header, then each tensor in chunks of at most
        chunk_bytes (gradserve.v1.wire). Small chunks share a message, the first one with
        the header, so a small job is a single message; a message holds at most chunk_bytes
        of encoded chunks (tiny chunks, a streamed job's rows, are mostly framing). on_progress
        hears of a message's tensor bytes when gRPC asks for the next one (it has taken this
        one)."""
        pending = [pb.ComputeRequest(header=self.header).SerializeToString()]
        pending_size = pending_bytes = sent = 0
        total = self.payload_bytes
        for name, offset, piece in self._pieces(chunk_bytes):
            chunk = wire.encode_chunk(name, offset, piece)
            if pending and pending_size + len(chunk) > chunk_bytes:
                yield b"".join(pending) if len(pending) > 1 else pending[0]
                sent += pending_bytes
                if self.on_progress is not None:
                    self.on_progress("upload", sent, total)
                pending, pending_size, pending_bytes = [], 0, 0
            pending.append(chunk)
            pending_size += len(chunk)
            pending_bytes += len(piece)
        yield b"".join(pending) if len(pending) > 1 else pending[0]
        if self.on_progress is not None:
            self.on_progress("upload", total, total)

    def _pieces(self, chunk_bytes: int) -> Iterator[tuple[str, int, memoryview]]:
        """(tensor, offset, bytes) in sending order: tensor after tensor, or for a streamed
        job the parameters, then the sample tensors interleaved micro-batch by micro-batch
        (a per-model one's rows of each micro-batch model by model)."""
        batch = self.header.micro_batch_samples
        for name, data in self.payloads:
            if not batch or name.startswith("layers."):
                yield from _split(name, data, 0, len(data), chunk_bytes)
        if not batch:
            return
        shapes = {d.name: tuple(d.shape) for d in self.header.tensors}
        total = shapes["inputs"][-2]
        samples = []  # (name, data, each lane's first byte, a row's bytes)
        for name, data in self.payloads:
            if not name.startswith("layers."):
                lane_bytes = len(data) // self._lanes(name, shapes[name])
                samples.append((name, data, range(0, len(data), lane_bytes), lane_bytes // total))
        for start in range(0, total, batch):
            end = min(start + batch, total)
            for name, data, lane_starts, row in samples:
                for first in lane_starts:
                    yield from _split(
                        name, data, first + start * row, first + end * row, chunk_bytes
                    )

    def _lanes(self, name: str, shape: tuple) -> int:
        """M for a sample tensor given per model ([M, N, ...]), 1 for a shared one."""
        cross_entropy = self.header.loss.kind == pb.LOSS_KIND_CROSS_ENTROPY
        return shape[0] if is_per_model(name, shape, cross_entropy) else 1

    @property
    def payload_bytes(self) -> int:
        return sum(len(d) for _, d in self.payloads)


def _split(name: str, data: memoryview, begin: int, end: int, chunk_bytes: int):
    """(name, offset, bytes) of data[begin:end] in pieces of at most chunk_bytes."""
    if 0 < end - begin <= chunk_bytes:  # a streamed job's rows: mostly one piece
        yield name, begin, data[begin:end]
        return
    for offset in range(begin, end, chunk_bytes):
        yield name, offset, data[offset : min(offset + chunk_bytes, end)]


def _agreeing_activation(given, inferred, what: str):
    """The activation to send: the model's own (from its modules) or the option's. A
    Sequential's modules say what it computes, so an option naming another is an error,
    not an override."""
    if given is None or inferred is None:
        return given or inferred
    name, slope = (given, None) if isinstance(given, str) else given
    if name != inferred[0] or (name == "leaky_relu" and slope not in (None, inferred[1])):
        raise ValueError(f"{what}={given!r} contradicts the model's own {inferred!r}")
    return inferred


# Options that only mean something to one optimiser: sent with another they would be ignored.
SGD_ONLY = ("momentum", "dampening", "nesterov")
ADAM_ONLY = ("betas", "eps")


def whole_number(value) -> bool:
    """An int or an integer-like (numpy's), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


# compute()'s options by the kind of value each takes (the rest are names, checked
# against their tables, callbacks and optimizer_state), so that a wrong one is refused
# naming itself rather than by protobuf's "'float' object cannot be interpreted as an
# integer" as the header is filled.
WHOLE_OPTIONS = ("steps", "start_step", "micro_batch_samples", "noise_seed")
REAL_OPTIONS = ("huber_delta", "negative_slope", "clip_norm", "noise_multiplier",
                "learning_rate", "momentum", "dampening", "weight_decay", "eps")  # fmt: skip
SWITCHES = ("parameter_gradients", "input_gradients", "per_sample_losses",
            "per_sample_gradient_norms", "forward_outputs", "allow_non_finite", "nesterov",
            "return_optimizer_state")  # fmt: skip


def _real_number(value) -> bool:
    """A number that converts to a float (numpy's and 0-d tensors too), not text or a bool."""
    if isinstance(value, (str, bytes, bool)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_option_types(opts: JobOptions) -> None:
    for name in WHOLE_OPTIONS:
        value = getattr(opts, name)
        if value is None or (name == "noise_seed" and whole_number(value)):
            continue  # a seed's range, [0, 2**64), is checked below
        if not (whole_number(value) and -(2**63) <= value < 2**63):  # the wire's int64
            raise TypeError(f"{name} must be a whole number, got {value!r}")
    for name in REAL_OPTIONS:
        value = getattr(opts, name)
        if value is not None and not _real_number(value):
            raise TypeError(f"{name} must be a number, got {value!r}")
    betas = opts.betas
    if betas is not None and not (
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(_real_number, betas))
    ):
        raise TypeError(f"betas must be a pair of numbers (beta1, beta2), got {betas!r}")
    for name in SWITCHES:
        value = getattr(opts, name)
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def check_options(opts: JobOptions) -> None:
    """Refuse options that the wire would carry as something other than what they say: a
    huber_delta of 0 is the wire's "default 1.0", and options of a feature the job does not
    use (training options without an optimizer, momentum for adam) would be ignored."""
    _check_option_types(opts)
    try:
        delta = float(opts.huber_delta)
    except (TypeError, ValueError):
        delta = math.nan
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"huber_delta must be a positive finite number, got {opts.huber_delta!r}")
    if opts.noise_seed is not None and not 0 <= opts.noise_seed < 1 << 64:
        raise ValueError(f"noise_seed must be in [0, 2**64), got {opts.noise_seed}")
    if opts.optimizer is None:
        training = {
            "steps": opts.steps != 1,
            "learning_rate": opts.learning_rate is not None,
            "weight_decay": opts.weight_decay is not None,
            "start_step": opts.start_step != 0,
            "return_optimizer_state": opts.return_optimizer_state,
            "optimizer_state": opts.optimizer_state is not None,
            "on_step": opts.on_step is not None,
        }
        training.update({name: bool(getattr(opts, name)) for name in SGD_ONLY})
        training.update({name: getattr(opts, name) is not None for name in ADAM_ONLY})
        given = [name for name, is_set in training.items() if is_set]
        if given:
            raise ValueError(f"{', '.join(given)}: options of server-side training, which "
                             "needs optimizer ('sgd', 'adam' or 'adamw')")  # fmt: skip
        return
    _check_optimizer_state(opts.optimizer_state)
    if opts.optimizer == "sgd":
        stray = [name for name in ADAM_ONLY if getattr(opts, name) is not None]
    else:
        stray = [name for name in SGD_ONLY if getattr(opts, name)]
    if stray:
        raise ValueError(f"{', '.join(stray)}: not options of optimizer {opts.optimizer!r}")


def _check_optimizer_state(state) -> None:
    """optimizer_state is an earlier result's, by wire name; anything else (torch.optim's
    state_dict(), a key that would replace one of the job's own tensors) is refused here
    with what it should be, not sent."""
    if state is None:
        return
    what = "optimizer_state takes an earlier result's optimizer_state"
    if not isinstance(state, dict):
        raise TypeError(f"{what} (a dict), got {type(state).__name__}")
    odd = next((key for key in state if not is_optimizer_state(key)), None)
    if odd is not None:
        torch_optim = odd in ("state", "param_groups")
        raise ValueError(
            f"{what}, keyed like 'layers.0.weight.exp_avg'; got key {odd!r}"
            + (" (torch.optim's state_dict() is none)" if torch_optim else "")
        )


def build_job(ensemble: Ensemble, inputs, targets, sample_weights, opts: JobOptions) -> WireJob:
    check_options(opts)
    hidden = (
        _agreeing_activation(opts.hidden_activation, ensemble.hidden_activation,
                             "hidden_activation") or "relu"
    )  # fmt: skip
    output = (
        _agreeing_activation(opts.output_activation, ensemble.output_activation,
                             "output_activation") or "identity"
    )  # fmt: skip
    if isinstance(hidden, str) and hidden == "leaky_relu":
        hidden = (hidden, opts.negative_slope)
    if isinstance(output, str) and output == "leaky_relu":
        output = (output, opts.negative_slope)
    grad_dtype = 0
    if opts.gradient_dtype is not None:
        grad_dtype = _choice(DATA_TYPE_BY_NAME, opts.gradient_dtype, "gradient_dtype")
    tensors = dict(ensemble.params)
    tensors["inputs"] = as_array(inputs, "inputs")
    tensors["targets"] = as_array(targets, "targets")
    if opts.loss != "cross_entropy":  # class indices stay integers
        tensors["targets"] = whole_as_floats(tensors["targets"])
    if sample_weights is not None:
        tensors["sample_weights"] = whole_as_floats(as_array(sample_weights, "sample_weights"))
    for name, value in (opts.optimizer_state or {}).items():
        tensors[name] = as_array(value, name)
    for name, value in tensors.items():
        if name != "targets":
            check_floating(value, name)
    if opts.precision != "float64":
        tensors = {name: float64_as_float32(value) for name, value in tensors.items()}
    descriptors, payloads = [], []
    for name, value in tensors.items():
        dtype, shape, data = to_wire(value, name)
        descriptors.append(pb.TensorDescriptor(name=name, dtype=dtype, shape=shape))
        payloads.append((name, data))
    header = pb.JobHeader(
        architecture=pb.Architecture(
            layer_sizes=ensemble.layer_sizes,
            hidden_activation=_activation(hidden),
            output_activation=_activation(output),
            layers_without_bias=ensemble.layers_without_bias,
        ),
        loss=pb.Loss(
            kind=_choice(LOSSES, opts.loss, "loss"),
            reduction=_choice(REDUCTIONS, opts.reduction, "reduction"),
            huber_delta=opts.huber_delta,
        ),
        outputs=pb.Outputs(
            skip_parameter_gradients=not opts.parameter_gradients,
            input_gradients=opts.input_gradients,
            per_sample_losses=opts.per_sample_losses,
            per_sample_gradient_norms=opts.per_sample_gradient_norms,
            forward_outputs=opts.forward_outputs,
        ),
        precision=_choice(PRECISIONS, opts.precision, "precision"),
        backend=_choice(BACKENDS, opts.backend, "backend"),
        gradient_dtype=grad_dtype,
        tensors=descriptors,
        allow_non_finite=opts.allow_non_finite,
        client_tag=opts.tag,
    )
    if opts.clip_norm is not None:
        header.privacy.clip_norm = opts.clip_norm
        header.privacy.noise_multiplier = opts.noise_multiplier
        if opts.noise_seed is not None:
            header.privacy.noise_seed = opts.noise_seed
    elif opts.noise_multiplier or opts.noise_seed is not None:
        raise ValueError("noise_multiplier and noise_seed need clip_norm (DP-SGD clipping)")
    if opts.optimizer is not None:
        _set_optimizer(header.optimizer, opts)
    header.micro_batch_samples = opts.micro_batch_samples
    as_torch = ensemble.as_torch or any(is_torch(v) for v in (inputs, targets))
    device = accelerator_of(*ensemble.params.values(), inputs, targets)
    return WireJob(header, payloads, ensemble, as_torch, opts.on_step, opts.on_progress, device)


def _set_optimizer(o: pb.OptimizerOptions, opts: JobOptions) -> None:
    if opts.learning_rate is None:
        raise ValueError("optimizer steps need learning_rate")
    o.kind = _choice(OPTIMIZERS, opts.optimizer, "optimizer")
    o.steps = opts.steps
    o.learning_rate = opts.learning_rate
    o.momentum = opts.momentum
    o.dampening = opts.dampening
    o.nesterov = opts.nesterov
    if opts.weight_decay is not None:
        o.weight_decay = opts.weight_decay
    if opts.betas is not None:
        o.beta1, o.beta2 = opts.betas
    if opts.eps is not None:
        o.eps = opts.eps
    o.start_step = opts.start_step
    o.return_state = opts.return_optimizer_state


@dataclass
class ComputeResult:
    """What a job returned, in the kind (numpy or torch) and form the caller gave.

    loss: [M] per-model loss. For a single nn.Sequential every result but `tensors` comes
    without the model axis, as torch gives it: the loss a scalar, outputs [N, dL], ...
    gradients: parameter gradients keyed like the caller's parameters (a list of dicts for
        a list of Sequentials), or None when not requested.
    input_gradients [M, N, d0], per_sample_loss [M, N], per_sample_grad_norm [M, N],
    outputs [M, N, dL]: when requested.
    tensors: every result tensor by its wire name ("layers.0.weight.grad", ...), and
    wire_dtypes the dtype each came in ("bfloat16" ones reach numpy callers as float32).
    After optimiser steps (gradients None): losses [steps, M], the loss at each step;
    parameters, the updated parameters in the caller's form; optimizer_state by wire name
    ("layers.0.weight.exp_avg", ...) when requested, to pass back as optimizer_state; loss
    is the last step's.
    """

    loss: Any
    gradients: Any
    input_gradients: Any
    per_sample_loss: Any
    per_sample_grad_norm: Any
    outputs: Any
    tensors: dict[str, Any]
    job_id: str
    engine: str
    device: str
    summary: dict[str, Any] = field(default_factory=dict)
    losses: Any = None
    parameters: Any = None
    optimizer_state: dict[str, Any] | None = None
    # numpy has no bfloat16: numpy callers receive bfloat16 results widened (exactly).
    wire_dtypes: dict[str, str] = field(default_factory=dict)


_PARAMETER = re.compile(r"layers\.\d+\.(weight|bias)")
# Optimiser state by wire name, torch.optim's names after the parameter's.
_OPTIMIZER_STATE = re.compile(r"layers\.\d+\.(weight|bias)\.(exp_avg|exp_avg_sq|momentum_buffer)")


def is_parameter(name: str) -> bool:
    """A parameter's wire name ("layers.0.weight"), as opposed to its gradient or state."""
    return _PARAMETER.fullmatch(name) is not None


def is_optimizer_state(name: str) -> bool:
    """A piece of optimiser state's wire name ("layers.0.weight.exp_avg")."""
    return isinstance(name, str) and _OPTIMIZER_STATE.fullmatch(name) is not None


def result_from_tensors(ensemble: Ensemble, tensors: dict[str, Any], **meta) -> ComputeResult:
    """A ComputeResult from result tensors by wire name, in the caller's form and kind;
    `meta`: job_id, engine, device, summary."""
    per_model = ensemble.per_model
    if "losses" in tensors:  # optimiser steps
        params = {k: v for k, v in tensors.items() if is_parameter(k)}
        state = {k: v for k, v in tensors.items() if k.startswith("layers.") and k not in params}
        losses = tensors["losses"]
        return ComputeResult(
            loss=per_model(losses[-1]),
            gradients=None,
            input_gradients=None,
            per_sample_loss=None,
            per_sample_grad_norm=None,
            outputs=None,
            tensors=tensors,
            losses=losses[:, 0] if ensemble.form == "sequential" else losses,
            parameters=ensemble.parameters_back(params),
            optimizer_state=state or None,
            **meta,
        )
    grads = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    loss = tensors["loss"]
    return ComputeResult(
        loss=per_model(loss),
        gradients=ensemble.gradients_back(grads) if grads else None,
        input_gradients=per_model(tensors.get("inputs.grad")),
        per_sample_loss=per_model(tensors.get("per_sample_loss")),
        per_sample_grad_norm=per_model(tensors.get("per_sample_grad_norm")),
        outputs=per_model(tensors.get("outputs")),
        tensors=tensors,
        **meta,
    )


# Result buffers this large are paged in ahead of their chunks (see ResultAssembler.prefault).
PREFAULT_BYTES = 1 << 20
PAGE_BYTES = mmap.PAGESIZE


class Upload:
    """One attempt's request messages as gRPC takes them (`messages()`), calling done() once
    it has taken the last. An exception raised while making them (a caller's on_progress)
    is kept in `error`, so that the caller gets it rather than what gRPC makes of it: status
    UNKNOWN "Exception iterating requests!", or in asyncio a bare CancelledError."""

    def __init__(self, requests: Iterator[bytes], done: Callable[[], None]):
        self.requests = requests
        self.done = done
        self.error: Exception | None = None

    def messages(self) -> Iterator[bytes]:
        try:
            yield from self.requests
        except Exception as e:
            self.error = e
            raise
        self.done()


class ResultAssembler:
    """Consumes ComputeResponse messages in order; `result()` once the summary arrived."""

    def __init__(self, job: WireJob):
        self.job = job
        self.accepted: pb.JobAccepted | None = None
        self.descriptors: dict[str, pb.TensorDescriptor] = {}
        self.buffers: dict[str, np.ndarray] = {}  # uint8, filled chunk by chunk
        # bytes received of each run of a tensor: one run, or a streamed job's per-sample
        # result's M runs (each model's rows, sent micro-batch by micro-batch)
        self.received: dict[str, list[int]] = {}
        self.run_bytes: dict[str, int] = {}
        self.summary: pb.JobSummary | None = None
        self.steps_reported = 0
        self.untouched: list[np.ndarray] = []  # large result buffers not yet paged in
        self.result_bytes = self.received_bytes = 0
        self.streams_rows = False  # a streamed job's per-sample rows come during its upload

    def _protocol_error(self, message: str) -> GradserveError:
        return GradserveError(grpc.StatusCode.INTERNAL, f"malformed response stream: {message}")

    def _buffer(self, size: int, results) -> np.ndarray:
        """Room for a result's bytes (no zero-fill); a job whose results this process cannot
        hold fails with RESOURCE_EXHAUSTED (and its call is cancelled), not MemoryError."""
        try:
            return np.empty(size, dtype=np.uint8)
        except MemoryError:
            self.buffers.clear()
            shapes = ", ".join(f"{d.name} {list(d.shape)}" for d in results)
            raise GradserveError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the job's results ({shapes}) do not fit in this process's memory; ask for "
                "fewer (per-sample results take a row per model and sample)",
            ) from None

    def add(self, response: pb.ComputeResponse) -> None:
        if response.HasField("accepted"):
            self.accepted = response.accepted
            for d in response.accepted.results:
                size = NUMPY_DTYPES[d.dtype].itemsize
                for dim in d.shape:
                    size *= dim
                self.descriptors[d.name] = d
                self.buffers[d.name] = self._buffer(size, response.accepted.results)
                runs = d.shape[0] if self._sent_by_micro_batch(d.name) and size else 1
                self.received[d.name] = [0] * runs
                self.run_bytes[d.name] = size // runs
            self.result_bytes = sum(b.nbytes for b in self.buffers.values())
            # The server is still receiving the upload: page in the large buffers once it is
            # sent. Not while a streamed job's per-sample rows come during the upload: the
            # client must read them as they come (the server stops reading while its writes
            # wait), and they fill their buffers then.
            self.streams_rows = any(self._sent_by_micro_batch(name) for name in self.received)
            if not response.chunks and not self.streams_rows:
                self.untouched = [b for b in self.buffers.values() if b.nbytes >= PREFAULT_BYTES]
        for c in response.chunks:
            if c.name not in self.buffers:
                raise self._protocol_error(f"unexpected chunk {c.name!r} at {c.offset}")
            run_bytes, received = self.run_bytes[c.name], self.received[c.name]
            run = min(max(c.offset, 0) // max(run_bytes, 1), len(received) - 1)
            if c.offset != run * run_bytes + received[run]:
                raise self._protocol_error(f"unexpected chunk {c.name!r} at {c.offset}")
            end = c.offset + len(c.data)
            if end > (run + 1) * run_bytes:
                raise self._protocol_error(f"chunk of {c.name!r} past its end")
            memoryview(self.buffers[c.name])[c.offset : end] = c.data
            received[run] += len(c.data)
            self.received_bytes += len(c.data)
            if c.name == "losses" and self.job.on_step is not None:
                self._report_steps()
        # (the per-sample rows that come during a streamed job's upload are not reported:
        # the upload's progress is, and the download's once the rest comes)
        rows_only = self.streams_rows and all(
            self._sent_by_micro_batch(c.name) for c in response.chunks
        )
        if response.chunks and self.job.on_progress is not None and not rows_only:
            self.job.on_progress("download", self.received_bytes, self.result_bytes)
        if response.HasField("summary"):
            self.summary = response.summary

    def _sent_by_micro_batch(self, name: str) -> bool:
        """A streamed job's per-sample result: its M models' rows come as M runs."""
        return bool(self.job.header.micro_batch_samples) and name in PER_SAMPLE_RESULTS

    def prefault(self) -> None:
        """Page in the large result buffers before their chunks arrive, instead of faulting
        on the first write of each chunk as the results stream in: fresh memory costs the
        copy into it about twice the time of memory already touched (bench/transfer.py).
        Clients call this once their upload is handed over, so that it overlaps the
        server's compute rather than competing with the upload for the CPU. numpy releases
        the GIL while writing."""
        for buffer in self.untouched:
            buffer[::PAGE_BYTES] = 0  # a write per page: the kernel zero-fills the rest
        self.untouched = []

    def _on_device(self, tensor: Any) -> Any:
        return tensor if self.job.device is None else tensor.to(self.job.device)

    def _report_steps(self) -> None:
        """Hand each newly complete row of "losses" (one optimiser step) to on_step."""
        d = self.descriptors["losses"]
        models = d.shape[1]
        row = models * NUMPY_DTYPES[d.dtype].itemsize
        while (self.steps_reported + 1) * row <= self.received["losses"][0]:
            k = self.steps_reported
            if k >= self.job.steps_handed:
                raw = self.buffers["losses"][k * row : (k + 1) * row]
                losses = self._on_device(from_wire(raw.copy(), d.dtype, (models,),
                                                   self.job.as_torch))  # fmt: skip
                self.job.on_step(k, self.job.ensemble.per_model(losses))
                self.job.steps_handed = k + 1
            self.steps_reported += 1

    def result(self) -> ComputeResult:
        if self.accepted is None or self.summary is None:
            raise self._protocol_error("the stream ended before the job summary")
        short = [n for n, b in self.buffers.items() if sum(self.received[n]) != len(b)]
        if short:
            raise self._protocol_error(f"incomplete result tensors {short}")
        as_torch = self.job.as_torch
        tensors = {
            name: self._on_device(from_wire(self.buffers[name], d.dtype, d.shape, as_torch))
            for name, d in self.descriptors.items()
        }
        s = self.summary
        return result_from_tensors(
            self.job.ensemble,
            tensors,
            wire_dtypes={name: dtype_name(d.dtype) for name, d in self.descriptors.items()},
            job_id=self.accepted.job_id,
            engine=self.accepted.engine,
            device=self.accepted.device,
            summary={
                "upload_seconds": s.timings.upload_seconds,
                "queue_seconds": s.timings.queue_seconds,
                "compute_seconds": s.timings.compute_seconds,
                "download_seconds": s.timings.download_seconds,
                "flops": s.flops,
                "bytes_received": s.bytes_received,
                "bytes_sent": s.bytes_sent,
                "jobs_in_launch": s.jobs_in_launch,
                "models_in_launch": s.models_in_launch,
            },
        )
