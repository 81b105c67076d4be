"""Every rule that rejects a malformed or over-limit job, applied to the header alone,
before any payload byte is stored.

Malformed (shapes that disagree with the architecture, unknown enum values, missing or
duplicate tensors) -> INVALID_ARGUMENT. Well-formed but over the configured limits ->
RESOURCE_EXHAUSTED. Valid but not supported here -> UNIMPLEMENTED.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from gradserve.kernels import (
    Activation,
    LossSpec,
    MLPSpec,
    Optimizer,
    OutputRequest,
    Privacy,
    torch_engine,
)
from gradserve.server import codec
from gradserve.server.config import ServerConfig
from gradserve.server.errors import invalid, too_large
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1.shapes import PER_SAMPLE_RESULTS, SAMPLE_TENSORS, is_per_model

MIN_RESPONSE_CHUNK_BYTES = 4096
MIN_UPLOAD_CHUNK_BYTES = 4096  # the chunk size request messages are expected to reach
# Per-sample results ([M, N, ...]): EnsembleResult field -> wire name.
PER_SAMPLE_FIELDS = {
    "per_sample_loss": "per_sample_loss",
    "per_sample_grad_norm": "per_sample_grad_norm",
    "outputs": "outputs",
    "input_grads": "inputs.grad",
}
ACTIVATION_NAMES = {
    pb.ACTIVATION_KIND_UNSPECIFIED: "identity",
    pb.ACTIVATION_KIND_IDENTITY: "identity",
    pb.ACTIVATION_KIND_RELU: "relu",
    pb.ACTIVATION_KIND_LEAKY_RELU: "leaky_relu",
    pb.ACTIVATION_KIND_TANH: "tanh",
    pb.ACTIVATION_KIND_SIGMOID: "sigmoid",
    pb.ACTIVATION_KIND_GELU: "gelu",
    pb.ACTIVATION_KIND_SILU: "silu",
    pb.ACTIVATION_KIND_SOFTPLUS: "softplus",
}
LOSS_NAMES = {
    pb.LOSS_KIND_UNSPECIFIED: "mse",
    pb.LOSS_KIND_MSE: "mse",
    pb.LOSS_KIND_L1: "l1",
    pb.LOSS_KIND_HUBER: "huber",
    pb.LOSS_KIND_BCE_WITH_LOGITS: "bce_with_logits",
    pb.LOSS_KIND_CROSS_ENTROPY: "cross_entropy",
}
REDUCTION_NAMES = {
    pb.REDUCTION_UNSPECIFIED: "mean",
    pb.REDUCTION_MEAN: "mean",
    pb.REDUCTION_SUM: "sum",
}
PRECISION_NAMES = {
    pb.PRECISION_UNSPECIFIED: "float32",
    pb.PRECISION_FLOAT32: "float32",
    pb.PRECISION_TF32: "tf32",
    pb.PRECISION_BFLOAT16: "bfloat16",
    pb.PRECISION_FLOAT16: "float16",
    pb.PRECISION_FLOAT64: "float64",
}
BACKEND_NAMES = {
    pb.BACKEND_UNSPECIFIED: "auto",
    pb.BACKEND_AUTO: "auto",
    pb.BACKEND_TORCH: "torch",
    pb.BACKEND_TRITON: "triton",
}
OPTIMIZER_NAMES = {
    pb.OPTIMIZER_KIND_SGD: "sgd",
    pb.OPTIMIZER_KIND_ADAM: "adam",
    pb.OPTIMIZER_KIND_ADAMW: "adamw",
}
GRADIENT_DTYPES = (
    pb.DATA_TYPE_FLOAT32,
    pb.DATA_TYPE_FLOAT64,
    pb.DATA_TYPE_FLOAT16,
    pb.DATA_TYPE_BFLOAT16,
)


# Options the engines use as float32 scalars must be finite there, not only as doubles, and
# positive ones must not round to 0.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: int
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class JobPlan:
    """A validated header: what to receive, what to run, what to send back."""

    mlp: MLPSpec
    loss: LossSpec
    outputs: OutputRequest
    precision: str
    backend: str
    gradient_dtype: int
    tensors: dict[str, TensorSpec]
    num_models: int
    num_samples: int
    shared_inputs: bool
    allow_non_finite: bool
    response_chunk_bytes: int
    client_tag: str
    privacy: Privacy | None = None
    optimizer: Optimizer | None = None
    micro_batch_samples: int = 0  # > 0: a streamed job (see server.streaming)
    # Sample tensors given per model ([M, N, ...]) rather than shared ([N, ...]).
    per_model_samples: frozenset[str] = frozenset()

    @property
    def needs_per_sample_norms(self) -> bool:
        return self.outputs.per_sample_gradient_norms or self.privacy is not None

    @property
    def samples_at_once(self) -> int:
        """Samples one engine launch computes: all N, or a streamed job's micro-batch."""
        if self.micro_batch_samples:
            return min(self.micro_batch_samples, self.num_samples)
        return self.num_samples

    @property
    def steps(self) -> int:
        return self.optimizer.steps if self.optimizer is not None else 1

    @property
    def steps_per_micro_batch(self) -> bool:
        """A streamed job that takes an optimiser step on each of its micro-batches (more
        than one), rather than one on all its samples (server.streaming.MicroBatchSteps)."""
        return bool(self.micro_batch_samples) and self.steps > 1

    @property
    def passes(self) -> int:
        """Forward and backward passes over all the samples."""
        return 1 if self.steps_per_micro_batch else self.steps

    def optimizer_state_names(self) -> list[str]:
        """Names of the optimiser state tensors of every parameter (none without steps)."""
        if self.optimizer is None:
            return []
        params = self.mlp.parameter_names()
        return [f"{p}.{s}" for p in params for s in self.optimizer.state_names]

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def max_request_messages(self) -> int:
        """Most request messages the job may arrive in: one per 2 KiB of its tensor bytes
        (a client that fills its messages to MIN_UPLOAD_CHUNK_BYTES sends at most that, a
        small last piece of a tensor closing a message early), plus two per tensor and
        micro-batch for those last pieces. Bounds what a job sent in tiny messages costs
        the event loop every job shares."""
        batches = 1
        if self.micro_batch_samples:
            batches += -(-self.num_samples // self.micro_batch_samples)
        return self.payload_bytes // (MIN_UPLOAD_CHUNK_BYTES // 2) + 2 * len(self.tensors) * (
            batches + 1
        )

    @property
    def max_request_chunks(self) -> int:
        """Most chunks the job's tensor bytes may come in: one per MIN_UPLOAD_CHUNK_BYTES,
        plus for each tensor (each model's rows of a per-model sample tensor) one per
        micro-batch and two more, for the short pieces that end them. Bounds the per-chunk
        work a job sent in tiny chunks (a message may carry thousands) costs the event loop
        every job shares."""
        batches = 1
        if self.micro_batch_samples:
            batches += -(-self.num_samples // self.micro_batch_samples)
        runs = sum(self.num_models if n in self.per_model_samples else 1 for n in self.tensors)
        return self.payload_bytes // MIN_UPLOAD_CHUNK_BYTES + runs * (batches + 1)

    def check_chunk_count(self, chunks: int) -> None:
        """Refuse (INVALID_ARGUMENT) a job whose chunks so far exceed max_request_chunks."""
        if chunks > self.max_request_chunks:
            raise invalid(
                f"the job's {self.payload_bytes} tensor bytes came in more than "
                f"{self.max_request_chunks} chunks; send chunks of at least "
                f"{MIN_UPLOAD_CHUNK_BYTES} bytes (only a tensor's, or a micro-batch's, last "
                "piece may be shorter)"
            )

    @property
    def sample_tensors(self) -> list[str]:
        return [name for name in self.tensors if not name.startswith("layers.")]

    @property
    def held_bytes(self) -> int:
        """Payload bytes the server holds at once: all of them, or for a streamed job the
        parameters plus about three micro-batches of samples (two ahead, one in use), and
        at most one request message more."""
        if not self.micro_batch_samples:
            return self.payload_bytes
        held, samples = 0, self.sample_tensors
        for name, t in self.tensors.items():
            if name in samples:
                held += 3 * self.samples_at_once * t.nbytes // self.num_samples
            else:
                held += t.nbytes
        return held

    def result_descriptors(self) -> list[pb.TensorDescriptor]:
        """Result tensors in sending order: loss first, then gradients last layer first; a
        streamed job's per-sample results before them all (sent micro-batch by
        micro-batch, server.streaming)."""
        m, n = self.num_models, self.num_samples
        sizes = self.mlp.layer_sizes
        float_out = pb.DATA_TYPE_FLOAT64 if self.precision == "float64" else pb.DATA_TYPE_FLOAT32
        if self.optimizer is not None:
            return self._training_descriptors(float_out)
        out = [codec.descriptor("loss", float_out, (m,))]
        if self.outputs.per_sample_losses:
            out.append(codec.descriptor("per_sample_loss", float_out, (m, n)))
        if self.outputs.per_sample_gradient_norms:
            out.append(codec.descriptor("per_sample_grad_norm", float_out, (m, n)))
        if self.outputs.forward_outputs:
            out.append(codec.descriptor("outputs", float_out, (m, n, sizes[-1])))
        if self.outputs.parameter_gradients:
            for i in reversed(range(self.mlp.num_layers)):
                w = (m, sizes[i + 1], sizes[i])
                out.append(codec.descriptor(f"layers.{i}.weight.grad", self.gradient_dtype, w))
                if self.mlp.has_bias(i):
                    b = (m, sizes[i + 1])
                    out.append(codec.descriptor(f"layers.{i}.bias.grad", self.gradient_dtype, b))
        if self.outputs.input_gradients:
            out.append(codec.descriptor("inputs.grad", self.gradient_dtype, (m, n, sizes[0])))
        if self.micro_batch_samples:  # a streamed job's per-sample rows go as computed
            first = [d for d in out if d.name in PER_SAMPLE_RESULTS]
            out = first + [d for d in out if d.name not in PER_SAMPLE_RESULTS]
        return out

    def _training_descriptors(self, dtype: int) -> list[pb.TensorDescriptor]:
        """Losses per step (streamed as the steps run), then the updated parameters last
        layer first, then the optimiser state on request."""
        m, sizes = self.num_models, self.mlp.layer_sizes
        out = [codec.descriptor("losses", dtype, (self.optimizer.steps, m))]
        for i in reversed(range(self.mlp.num_layers)):
            out.append(codec.descriptor(f"layers.{i}.weight", dtype, (m, sizes[i + 1], sizes[i])))
            if self.mlp.has_bias(i):
                out.append(codec.descriptor(f"layers.{i}.bias", dtype, (m, sizes[i + 1])))
        if self.optimizer.return_state:
            shapes = {d.name: tuple(d.shape) for d in out}
            for name in self.optimizer_state_names():
                out.append(codec.descriptor(name, dtype, shapes[name.rsplit(".", 1)[0]]))
        return out


def _enum(value: int, names: dict[int, str], what: str) -> str:
    if value not in names:
        raise invalid(f"unknown {what} value {value}", what)
    return names[value]


def _activation(msg: pb.Activation, what: str) -> Activation:
    name = _enum(msg.kind, ACTIVATION_NAMES, what)
    slope = msg.negative_slope or 0.01
    if not (math.isfinite(slope) and abs(slope) <= FLOAT32_MAX):
        raise invalid(
            f"{what}.negative_slope must be a finite float32 value, got {slope}",
            f"{what}.negative_slope",
        )
    return Activation(name, slope)


def _loss(msg: pb.Loss) -> LossSpec:
    name = _enum(msg.kind, LOSS_NAMES, "loss.kind")
    reduction = _enum(msg.reduction, REDUCTION_NAMES, "loss.reduction")
    delta = msg.huber_delta or 1.0
    if not (math.isfinite(delta) and FLOAT32_TINY <= delta <= FLOAT32_MAX):
        raise invalid(
            f"loss.huber_delta must be a positive finite float32 value, got {delta}",
            "loss.huber_delta",
        )
    return LossSpec(name, reduction, delta)


def _privacy(header: pb.JobHeader, parameter_gradients: bool) -> Privacy | None:
    if not header.HasField("privacy"):
        return None
    p = header.privacy
    if not (math.isfinite(p.clip_norm) and FLOAT32_TINY <= p.clip_norm <= FLOAT32_MAX):
        raise invalid(
            f"privacy.clip_norm must be a positive finite float32 value, got {p.clip_norm}",
            "privacy.clip_norm",
        )
    # the noise's standard deviation, noise_multiplier * clip_norm, too
    noise = p.noise_multiplier
    if not (math.isfinite(noise) and 0 <= noise and noise * p.clip_norm <= FLOAT32_MAX):
        raise invalid(
            "privacy.noise_multiplier must be >= 0, and times clip_norm a finite float32 "
            f"value; got {p.noise_multiplier}",
            "privacy.noise_multiplier",
        )
    if not parameter_gradients:
        raise invalid(
            "privacy clips parameter gradients, but outputs.skip_parameter_gradients is set",
            "outputs.skip_parameter_gradients",
        )
    seed = p.noise_seed if p.HasField("noise_seed") else secrets.randbits(63)
    return Privacy(p.clip_norm, p.noise_multiplier, seed)


def _number(value: float, what: str, low: float, *, above: bool = False, below=None) -> float:
    """A finite float32 option >= low (> low with `above`), and < `below` if given."""
    ok = math.isfinite(value) and abs(value) <= FLOAT32_MAX
    ok = ok and (value > low if above else value >= low)
    if below is not None:
        ok = ok and value < below
    if not ok:
        bound = f"{'>' if above else '>='} {low}" + (f" and < {below}" if below is not None else "")
        raise invalid(f"{what} must be a finite float32 value {bound}, got {value}", what)
    return value


def _optimizer(header: pb.JobHeader, config: ServerConfig) -> Optimizer | None:
    if not header.HasField("optimizer"):
        return None
    o = header.optimizer
    if o.kind not in OPTIMIZER_NAMES:
        raise invalid(f"optimizer.kind must be sgd, adam or adamw, got {o.kind}", "optimizer.kind")
    kind = OPTIMIZER_NAMES[o.kind]
    if o.steps < 1:
        raise invalid(f"optimizer.steps must be >= 1, got {o.steps}", "optimizer.steps")
    if o.steps > config.max_optimizer_steps:
        hint = " (larger micro-batches take fewer steps)" if header.micro_batch_samples else ""
        raise too_large(
            f"{o.steps} optimizer steps exceed the limit of {config.max_optimizer_steps}{hint}"
        )
    if o.start_step < 0:
        raise invalid("optimizer.start_step must be >= 0", "optimizer.start_step")
    if o.nesterov and (o.momentum <= 0 or o.dampening != 0):
        raise invalid("nesterov needs momentum > 0 and dampening 0", "optimizer.nesterov")
    # An option of the other optimiser would be ignored: refuse it rather than run a job
    # that differs from the one the caller meant.
    if kind == "sgd":
        stray = [name for name in ("beta1", "beta2", "eps") if o.HasField(name)]
    else:
        stray = [name for name in ("momentum", "dampening", "nesterov") if getattr(o, name)]
    if stray:
        raise invalid(f"optimizer.{stray[0]} is not an option of {kind}", f"optimizer.{stray[0]}")
    decay = o.weight_decay if o.HasField("weight_decay") else (0.01 if kind == "adamw" else 0.0)
    optimizer = Optimizer(
        kind=kind,
        steps=o.steps,
        learning_rate=_number(o.learning_rate, "optimizer.learning_rate", 0, above=True),
        momentum=_number(o.momentum, "optimizer.momentum", 0),
        dampening=_number(o.dampening, "optimizer.dampening", 0),
        nesterov=o.nesterov,
        weight_decay=_number(decay, "optimizer.weight_decay", 0),
        beta1=_number(o.beta1 if o.HasField("beta1") else 0.9, "optimizer.beta1", 0, below=1),
        beta2=_number(o.beta2 if o.HasField("beta2") else 0.999, "optimizer.beta2", 0, below=1),
        eps=_number(o.eps if o.HasField("eps") else 1e-8, "optimizer.eps", 0, above=True),
        start_step=o.start_step,
        return_state=o.return_state,
    )
    if kind != "sgd":
        # The update multiplies by these scalars, which must be finite float32 values too:
        # Adam's step size lr / (1 - beta1**step) is at most lr / (1 - beta1); AdamW decays
        # the parameters by 1 - lr * weight_decay.
        lr = optimizer.learning_rate
        if lr / (1 - optimizer.beta1) > FLOAT32_MAX or lr * optimizer.weight_decay > FLOAT32_MAX:
            raise invalid(
                "optimizer.learning_rate is too large: learning_rate / (1 - beta1) and "
                "learning_rate * weight_decay must be finite float32 values",
                "optimizer.learning_rate",
            )
    return optimizer


def _micro_batch(header: pb.JobHeader) -> int:
    """micro_batch_samples, checked."""
    micro = header.micro_batch_samples
    if micro < 0:
        raise invalid("micro_batch_samples must be >= 0", "micro_batch_samples")
    return micro


TRAINING_EXCLUDES = (
    "input_gradients",
    "per_sample_losses",
    "per_sample_gradient_norms",
    "forward_outputs",
    "skip_parameter_gradients",
)


def _layer_sizes(arch: pb.Architecture, config: ServerConfig) -> tuple[int, ...]:
    sizes = tuple(arch.layer_sizes)
    if len(sizes) < 2:
        raise invalid(
            "architecture.layer_sizes needs at least two entries [d_in, d_out]",
            "architecture.layer_sizes",
        )
    if any(d < 1 for d in sizes):
        raise invalid(
            f"architecture.layer_sizes must all be >= 1, got {list(sizes)}",
            "architecture.layer_sizes",
        )
    if len(sizes) - 1 > config.max_layers:
        raise too_large(f"{len(sizes) - 1} layers exceed the limit of {config.max_layers}")
    if max(sizes) > config.max_width:
        raise too_large(f"layer width {max(sizes)} exceeds the limit of {config.max_width}")
    return sizes


def _layers_without_bias(arch: pb.Architecture, num_layers: int) -> tuple[int, ...]:
    layers = tuple(arch.layers_without_bias)
    if any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers):
        raise invalid(
            f"architecture.layers_without_bias must name distinct layers in [0, {num_layers}), "
            f"got {list(layers)}",
            "architecture.layers_without_bias",
        )
    return tuple(sorted(layers))


def _expected_shapes(mlp: MLPSpec, loss: str, m: int, n: int, shared: bool, has_weights: bool):
    """name -> (allowed dtypes, expected shape) for every tensor the job must carry."""
    sizes = mlp.layer_sizes
    lead = (n,) if shared else (m, n)
    expected = {}
    for i in range(len(sizes) - 1):
        expected[f"layers.{i}.weight"] = (codec.FLOAT_DTYPES, (m, sizes[i + 1], sizes[i]))
        if mlp.has_bias(i):
            expected[f"layers.{i}.bias"] = (codec.FLOAT_DTYPES, (m, sizes[i + 1]))
    expected["inputs"] = (codec.FLOAT_DTYPES, (*lead, sizes[0]))
    if loss == "cross_entropy":
        expected["targets"] = (codec.INT_DTYPES, lead)
    else:
        expected["targets"] = (codec.FLOAT_DTYPES, (*lead, sizes[-1]))
    if has_weights:
        expected["sample_weights"] = (codec.FLOAT_DTYPES, lead)
    return expected


def _declared(header: pb.JobHeader) -> dict[str, pb.TensorDescriptor]:
    declared: dict[str, pb.TensorDescriptor] = {}
    for t in header.tensors:
        if t.name in declared:
            raise invalid(f"tensor {t.name!r} is declared twice", f"tensors[{t.name}]")
        if t.dtype not in codec.ITEM_SIZES:
            raise invalid(
                f"tensor {t.name!r} has unknown dtype value {t.dtype}", f"tensors[{t.name}].dtype"
            )
        if any(d < 1 for d in t.shape):
            raise invalid(
                f"tensor {t.name!r} has a dimension < 1: {list(t.shape)}",
                f"tensors[{t.name}].shape",
            )
        declared[t.name] = t
    for name in ("layers.0.weight", "inputs"):
        if name not in declared:
            raise invalid(f"tensor {name!r} is missing", f"tensors[{name}]")
    return declared


def validate_header(header: pb.JobHeader, config: ServerConfig, device_type: str) -> JobPlan:
    """The job a header describes, checked against the server's limits; `device_type`: the
    server's device ("cpu", "cuda"), whose engine sets the working memory a job needs."""
    sizes = _layer_sizes(header.architecture, config)
    hidden = _activation(header.architecture.hidden_activation, "hidden_activation")
    output = _activation(header.architecture.output_activation, "output_activation")
    no_bias = _layers_without_bias(header.architecture, len(sizes) - 1)
    mlp = MLPSpec(sizes, hidden, output, no_bias)
    loss = _loss(header.loss)
    precision = _enum(header.precision, PRECISION_NAMES, "precision")
    backend = _enum(header.backend, BACKEND_NAMES, "backend")
    grad_dtype = header.gradient_dtype or (
        pb.DATA_TYPE_FLOAT64 if precision == "float64" else pb.DATA_TYPE_FLOAT32
    )
    if grad_dtype not in GRADIENT_DTYPES:
        raise invalid(
            f"gradient_dtype {grad_dtype} is not a floating-point dtype", "gradient_dtype"
        )
    privacy = _privacy(header, not header.outputs.skip_parameter_gradients)
    optimizer = _optimizer(header, config)
    if optimizer is not None:
        for name in TRAINING_EXCLUDES:
            if getattr(header.outputs, name):
                raise invalid(
                    f"outputs.{name} cannot be combined with optimizer steps (they return "
                    "losses and updated parameters)",
                    f"outputs.{name}",
                )
    chunk = header.response_chunk_bytes or config.chunk_bytes
    # A floor: results in chunks of a few bytes would cost the event loop, which all jobs
    # share, a write per few bytes (unless the operator's own default is smaller).
    smallest = min(MIN_RESPONSE_CHUNK_BYTES, config.chunk_bytes)
    if not smallest <= chunk <= config.max_chunk_bytes:
        raise invalid(
            f"response_chunk_bytes must be in [{smallest}, {config.max_chunk_bytes}], got "
            f"{header.response_chunk_bytes}",
            "response_chunk_bytes",
        )

    declared = _declared(header)
    w0_shape = tuple(declared["layers.0.weight"].shape)
    in_shape = tuple(declared["inputs"].shape)
    if len(w0_shape) != 3 or len(in_shape) not in (2, 3):
        raise invalid(
            f"layers.0.weight must be [M, d1, d0] and inputs [M, N, d0] or [N, d0]; got "
            f"{list(w0_shape)} and {list(in_shape)}"
        )
    m, n, shared = w0_shape[0], in_shape[-2], len(in_shape) == 2
    expected = _expected_shapes(mlp, loss.name, m, n, shared, "sample_weights" in declared)
    carries_state = optimizer is not None and any(name not in expected for name in declared)
    if optimizer is not None and optimizer.state_names:
        # Adam's bias correction counts the steps the state has taken: state and start_step
        # come together (sgd's momentum buffer has no step count).
        if optimizer.start_step and not carries_state:
            raise invalid(
                f"optimizer.start_step {optimizer.start_step} continues earlier {optimizer.kind} "
                f"steps: send their state ({', '.join(optimizer.state_names)} of every "
                "parameter) too, or start at step 0",
                "optimizer.start_step",
            )
        if carries_state and not optimizer.start_step and optimizer.kind != "sgd":
            raise invalid(
                f"{optimizer.kind} state was sent with optimizer.start_step 0: give the number "
                "of steps it has taken (the previous result's steps)",
                "optimizer.start_step",
            )
    if carries_state:
        # Incoming optimiser state: every parameter's, shaped like it, or none at all.
        for param, (dtypes, shape) in list(expected.items()):
            if param.startswith("layers."):
                for state in optimizer.state_names:
                    expected[f"{param}.{state}"] = (dtypes, shape)
    for name in declared:
        if name not in expected:
            without = [f"layers.{i}.bias" for i in mlp.layers_without_bias]
            why = " (architecture.layers_without_bias names its layer)" if name in without else ""
            raise invalid(
                f"unexpected tensor {name!r}{why} (expected {sorted(expected)})",
                f"tensors[{name}]",
            )
    tensors: dict[str, TensorSpec] = {}
    per_model = set()  # sample tensors given per model ([M, N, ...])
    for name, (dtypes, shape) in expected.items():
        if name not in declared:
            raise invalid(f"tensor {name!r} is missing", f"tensors[{name}]")
        got = declared[name]
        if got.dtype not in dtypes:
            allowed = ", ".join(sorted(pb.DataType.Name(d) for d in dtypes))
            why = ""
            if name == "targets":
                why = (
                    ": cross_entropy takes class indices"
                    if loss.name == "cross_entropy"
                    else f": {loss.name} takes floating-point targets"
                )
            raise invalid(
                f"tensor {name!r} has dtype {pb.DataType.Name(got.dtype)}{why}; allowed: {allowed}",
                f"tensors[{name}].dtype",
            )
        got_shape = tuple(got.shape)
        if name in ("targets", "sample_weights"):
            # each shared ([N, ...]) or per model ([M, N, ...]), whatever the inputs are:
            # e.g. shared inputs with per-model targets or bootstrap weights
            if not shared and len(got_shape) == len(shape) - 1:
                shape = shape[1:]
            elif shared and len(got_shape) == len(shape) + 1:
                shape = (m, *shape)
        if got_shape != shape:
            raise invalid(
                f"tensor {name!r} has shape {list(got_shape)}, expected {list(shape)}",
                f"tensors[{name}].shape",
            )
        if name in SAMPLE_TENSORS and is_per_model(name, shape, loss.name == "cross_entropy"):
            per_model.add(name)
        tensors[name] = TensorSpec(name, got.dtype, got_shape, codec.nbytes(got.dtype, got_shape))

    micro = _micro_batch(header)
    batches = -(-n // micro) if micro else 1
    if micro and optimizer is not None and optimizer.steps not in (1, batches):
        raise invalid(
            f"a streamed job (micro_batch_samples) takes one optimizer step on all its "
            f"samples, or one on each micro-batch ({batches} here), not {optimizer.steps}: "
            "a further pass needs every sample again (send the updated parameters, and the "
            "optimizer state, as the next job)",
            "optimizer.steps",
        )
    if m > config.max_models:
        raise too_large(f"M={m} models exceed the limit of {config.max_models}")
    if n > config.max_samples:
        raise too_large(f"N={n} samples exceed the limit of {config.max_samples}")
    plan = JobPlan(
        mlp=mlp,
        loss=loss,
        outputs=OutputRequest(
            parameter_gradients=not header.outputs.skip_parameter_gradients,
            input_gradients=header.outputs.input_gradients,
            per_sample_losses=header.outputs.per_sample_losses,
            per_sample_gradient_norms=header.outputs.per_sample_gradient_norms,
            forward_outputs=header.outputs.forward_outputs,
        ),
        precision=precision,
        backend=backend,
        gradient_dtype=grad_dtype,
        tensors=tensors,
        num_models=m,
        num_samples=n,
        shared_inputs=shared,
        allow_non_finite=header.allow_non_finite,
        response_chunk_bytes=chunk,
        client_tag=header.client_tag[:200],
        privacy=privacy,
        optimizer=optimizer,
        micro_batch_samples=micro,
        per_model_samples=frozenset(per_model),
    )
    payload = plan.held_bytes
    if payload > config.max_job_bytes:
        held = "held " if micro else ""
        raise too_large(
            f"job of {payload} {held}bytes exceeds the limit of {config.max_job_bytes}"
            + ("" if micro else " (micro_batch_samples streams large N)")
        )
    # Activations, their gradients and autograd's saved tensors: about four float64-sized
    # copies of every layer's [m, n, d] activations, m and n the models and samples computed
    # at once: on a CPU, where the torch engine runs a large job in blocks, a block's.
    models, samples = m, plan.samples_at_once
    if device_type == "cpu":
        models, samples = torch_engine.block_shape(models, samples, sizes, precision)
    work = 4 * 8 * models * samples * sum(sizes) + 2 * payload
    if work > config.max_work_bytes:
        raise too_large(
            f"job needs about {work} bytes of working memory; the limit is {config.max_work_bytes}"
        )
    return plan
