"""Every kind of malformed or over-limit job gets its status code; the server keeps serving."""

from __future__ import annotations

import random
import threading

import grpc
import numpy as np
import pytest

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from tests.servers import run_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED

SIZES = [3, 5, 2]
M, N = 2, 4
MAX_CHUNK = 64 * 1024
MAX_INFLIGHT = 200_000


# The limits the CASES below are written against.
LIMITED_SERVER_FLAGS = (
    "--upload-idle-timeout-s", "1",
    "--max-chunk-bytes", str(MAX_CHUNK),
    "--chunk-bytes", str(MAX_CHUNK),
    "--max-inflight-bytes", str(MAX_INFLIGHT),
)  # fmt: skip


@pytest.fixture(scope="module")
def limited_server():
    with run_server(*LIMITED_SERVER_FLAGS) as running:
        yield running


@pytest.fixture(scope="module")
def stub(limited_server):
    with grpc.insecure_channel(limited_server.address) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def valid_tensors(loss: str = "mse") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        t[f"layers.{i}.weight"] = rng.standard_normal((M, b, a)).astype(np.float32)
        t[f"layers.{i}.bias"] = rng.standard_normal((M, b)).astype(np.float32)
    t["inputs"] = rng.standard_normal((M, N, SIZES[0])).astype(np.float32)
    if loss == "cross_entropy":
        t["targets"] = rng.integers(0, SIZES[-1], (M, N)).astype(np.int64)
    else:
        t["targets"] = rng.standard_normal((M, N, SIZES[-1])).astype(np.float32)
    return t


WIRE = {
    np.dtype("float32"): pb.DATA_TYPE_FLOAT32,
    np.dtype("int64"): pb.DATA_TYPE_INT64,
    np.dtype("float64"): pb.DATA_TYPE_FLOAT64,
}


def header_for(tensors, loss=pb.LOSS_KIND_MSE, **fields) -> pb.JobHeader:
    h = pb.JobHeader(
        architecture=pb.Architecture(
            layer_sizes=SIZES, hidden_activation=pb.Activation(kind=pb.ACTIVATION_KIND_RELU)
        ),
        loss=pb.Loss(kind=loss),
        tensors=[
            pb.TensorDescriptor(name=k, dtype=WIRE[v.dtype], shape=v.shape)
            for k, v in tensors.items()
        ],
    )
    for k, v in fields.items():
        setattr(h, k, v)
    return h


def chunks_for(tensors):
    return [
        pb.ComputeRequest(chunks=[pb.TensorChunk(name=k, offset=0, data=v.tobytes())])
        for k, v in tensors.items()
    ]


def valid_stream(loss="mse"):
    t = valid_tensors(loss)
    lk = pb.LOSS_KIND_CROSS_ENTROPY if loss == "cross_entropy" else pb.LOSS_KIND_MSE
    return [pb.ComputeRequest(header=header_for(t, loss=lk)), *chunks_for(t)]


def byte_by_byte():
    """A valid job whose tensors come one byte per request message."""
    t = valid_tensors()
    messages = [
        pb.ComputeRequest(chunks=[pb.TensorChunk(name=k, offset=i, data=v.tobytes()[i : i + 1])])
        for k, v in t.items()
        for i in range(v.nbytes)
    ]
    return [pb.ComputeRequest(header=header_for(t)), *messages]


def byte_chunks(in_first_message: bool):
    """A valid job whose tensors come one byte per chunk, all in one request message:
    the header's, or the next."""
    t = valid_tensors()
    chunks = [
        pb.TensorChunk(name=k, offset=i, data=v.tobytes()[i : i + 1])
        for k, v in t.items()
        for i in range(v.nbytes)
    ]
    if in_first_message:
        return [pb.ComputeRequest(header=header_for(t), chunks=chunks)]
    return [pb.ComputeRequest(header=header_for(t)), pb.ComputeRequest(chunks=chunks)]


def with_header(mutate):
    stream = valid_stream()
    mutate(stream[0].header)
    return stream


def set_shape(name, shape):
    def mutate(h):
        for d in h.tensors:
            if d.name == name:
                del d.shape[:]
                d.shape.extend(shape)

    return mutate


def split_chunk(stream, index, at):
    c = stream[index].chunks[0]
    first = pb.ComputeRequest(chunks=[pb.TensorChunk(name=c.name, offset=0, data=c.data[:at])])
    rest = pb.ComputeRequest(chunks=[pb.TensorChunk(name=c.name, offset=at, data=c.data[at:])])
    return stream[:index] + [first, rest] + stream[index + 1 :]


def drop_descriptor(name):
    def mutate(h):
        keep = [d for d in h.tensors if d.name != name]
        del h.tensors[:]
        h.tensors.extend(keep)

    return mutate


def nan_inputs():
    t = valid_tensors()
    t["inputs"][0, 1, 2] = np.nan
    return [pb.ComputeRequest(header=header_for(t)), *chunks_for(t)]


def float64_inputs_beyond_float32():
    """A float32 job whose inputs travel as float64, one of them past float32's range."""
    t = valid_tensors()
    t["inputs"] = t["inputs"].astype(np.float64)
    t["inputs"][1, 0, 0] = -1e39
    return [pb.ComputeRequest(header=header_for(t)), *chunks_for(t)]


def ce_targets(values, dtype=np.int64):
    t = valid_tensors("cross_entropy")
    t["targets"] = np.full((M, N), values).astype(dtype)
    return [
        pb.ComputeRequest(header=header_for(t, loss=pb.LOSS_KIND_CROSS_ENTROPY)),
        *chunks_for(t),
    ]


def integer_mse_targets():
    """Whole-number targets for a loss on real values, as int64 on the wire: the Python
    client sends them as floats, the wire takes floating-point targets only."""
    t = valid_tensors()
    t["targets"] = np.rint(t["targets"]).astype(np.int64)
    return [pb.ComputeRequest(header=header_for(t)), *chunks_for(t)]


def huge_declared_job():
    big = 2**40
    return with_header(
        lambda h: (
            set_shape("layers.0.weight", [big, 5, 3])(h),
            set_shape("layers.0.bias", [big, 5])(h),
            set_shape("layers.1.weight", [big, 2, 5])(h),
            set_shape("layers.1.bias", [big, 2])(h),
            set_shape("inputs", [big, N, 3])(h),
            set_shape("targets", [big, N, 2])(h),
        )
    )


def overflowing_dims():
    # Each dimension fits int64 but their product does not.
    return with_header(
        lambda h: (set_shape("inputs", [M, 2**62, 3])(h), set_shape("targets", [M, 2**62, 2])(h))
    )


CASES = {
    "no messages at all": ([], INVALID),
    "chunk before header": (valid_stream()[1:], INVALID),
    "empty request message": ([pb.ComputeRequest()], INVALID),
    "empty message after the header": (valid_stream()[:2] + [pb.ComputeRequest()], INVALID),
    "one layer size": (with_header(lambda h: h.architecture.layer_sizes.pop()), INVALID),
    "zero width": (with_header(lambda h: h.architecture.layer_sizes.__setitem__(1, 0)), INVALID),
    "negative width": (
        with_header(lambda h: h.architecture.layer_sizes.__setitem__(1, -5)),
        INVALID,
    ),
    "unknown activation": (
        with_header(lambda h: setattr(h.architecture.hidden_activation, "kind", 99)),
        INVALID,
    ),
    "unknown loss": (with_header(lambda h: setattr(h.loss, "kind", 42)), INVALID),
    "unknown reduction": (with_header(lambda h: setattr(h.loss, "reduction", 7)), INVALID),
    "unknown precision": (with_header(lambda h: setattr(h, "precision", 17)), INVALID),
    "unknown backend": (with_header(lambda h: setattr(h, "backend", 9)), INVALID),
    "non-float gradient dtype": (
        with_header(lambda h: setattr(h, "gradient_dtype", pb.DATA_TYPE_INT64)),
        INVALID,
    ),
    "float64 values beyond a float32 job's range": (float64_inputs_beyond_float32(), INVALID),
    "negative huber delta": (with_header(lambda h: setattr(h.loss, "huber_delta", -1.0)), INVALID),
    # finite doubles beyond float32's range, the engines' scalar type
    "huber delta beyond float32": (
        with_header(lambda h: setattr(h.loss, "huber_delta", 1e300)),
        INVALID,
    ),
    "leaky_relu slope beyond float32": (
        with_header(
            lambda h: h.architecture.hidden_activation.CopyFrom(
                pb.Activation(kind=pb.ACTIVATION_KIND_LEAKY_RELU, negative_slope=-1e39)
            )
        ),
        INVALID,
    ),
    "unknown tensor dtype": (with_header(lambda h: setattr(h.tensors[0], "dtype", 55)), INVALID),
    "weight shape disagrees with layer sizes": (
        with_header(set_shape("layers.1.weight", [M, 2, 4])),
        INVALID,
    ),
    "zero-sized dimension": (with_header(set_shape("inputs", [M, 0, 3])), INVALID),
    "targets missing": (with_header(drop_descriptor("targets"))[:-1], INVALID),
    "duplicate descriptor": (with_header(lambda h: h.tensors.append(h.tensors[0])), INVALID),
    "unexpected tensor": (
        with_header(lambda h: h.tensors.add(name="extra", dtype=pb.DATA_TYPE_FLOAT32, shape=[1])),
        INVALID,
    ),
    # layers without a bias: indices in range, each once, and no bias tensor for them
    "layer without bias out of range": (
        with_header(lambda h: h.architecture.layers_without_bias.append(len(SIZES) - 1)),
        INVALID,
    ),
    "negative layer without bias": (
        with_header(lambda h: h.architecture.layers_without_bias.append(-1)),
        INVALID,
    ),
    "layer without bias named twice": (
        with_header(lambda h: h.architecture.layers_without_bias.extend([0, 0])),
        INVALID,
    ),
    "bias sent for a layer without one": (
        with_header(lambda h: h.architecture.layers_without_bias.append(1)),
        INVALID,
    ),
    "stream ends before all bytes": (valid_stream()[:-1], INVALID),
    "duplicate chunk": (valid_stream() + [valid_stream()[2]], INVALID),
    "chunks out of order": (
        split_chunk(valid_stream(), 1, 8)[:1]
        + split_chunk(valid_stream(), 1, 8)[2:3]
        + split_chunk(valid_stream(), 1, 8)[1:2]
        + split_chunk(valid_stream(), 1, 8)[3:],
        INVALID,
    ),
    "chunk beyond declared size": (
        valid_stream()[:-1]
        + [
            pb.ComputeRequest(
                chunks=[pb.TensorChunk(name="targets", offset=0, data=b"\0" * (M * N * 2 * 4 + 4))]
            )
        ],
        INVALID,
    ),
    "chunk for undeclared tensor": (
        valid_stream()
        + [pb.ComputeRequest(chunks=[pb.TensorChunk(name="nope", offset=0, data=b"1234")])],
        INVALID,
    ),
    "empty chunk": (
        valid_stream()[:2]
        + [pb.ComputeRequest(chunks=[pb.TensorChunk(name="layers.0.bias", offset=0, data=b"")])],
        INVALID,
    ),
    "second header": (valid_stream()[:2] + valid_stream()[:1], INVALID),
    "NaN input under the reject policy": (nan_inputs(), INVALID),
    "cross-entropy class out of range": (ce_targets(SIZES[-1]), INVALID),
    "negative cross-entropy class": (ce_targets(-1), INVALID),
    "float cross-entropy targets": (ce_targets(1, np.float32), INVALID),
    "integer mse targets": (integer_mse_targets(), INVALID),
    "tensors one byte per message": (byte_by_byte(), INVALID),
    "tensors one byte per chunk in the header's message": (byte_chunks(True), INVALID),
    "tensors one byte per chunk in one message": (byte_chunks(False), INVALID),
    "results in chunks of a few bytes": (
        with_header(lambda h: setattr(h, "response_chunk_bytes", 16)),
        INVALID,
    ),
    "result chunks over the message limit": (
        with_header(lambda h: setattr(h, "response_chunk_bytes", MAX_CHUNK + 1)),
        INVALID,
    ),
    "absurd M": (huge_declared_job(), EXHAUSTED),
    "dimension product overflows int64": (overflowing_dims(), EXHAUSTED),
    "width over the limit": (
        with_header(lambda h: h.architecture.layer_sizes.__setitem__(1, 10**6)),
        EXHAUSTED,
    ),
    "job over the in-flight byte bound": (
        with_header(
            lambda h: (set_shape("inputs", [M, 9000, 3])(h), set_shape("targets", [M, 9000, 2])(h))
        ),
        EXHAUSTED,
    ),
    "chunk over the message limit": (
        valid_stream()[:1]
        + [
            pb.ComputeRequest(
                chunks=[
                    pb.TensorChunk(name="inputs", offset=0, data=b"\0" * (MAX_CHUNK + (2 << 20)))
                ]
            )
        ],
        EXHAUSTED,
    ),
    "negative micro-batch size": (
        with_header(lambda h: setattr(h, "micro_batch_samples", -1)),
        INVALID,
    ),
    "micro-batches of per-model inputs": (
        with_header(lambda h: setattr(h, "micro_batch_samples", 2)),
        INVALID,
    ),
    "zero DP clip norm": (with_header(lambda h: setattr(h.privacy, "clip_norm", 0.0)), INVALID),
    "negative DP clip norm": (
        with_header(lambda h: setattr(h.privacy, "clip_norm", -2.0)),
        INVALID,
    ),
    "NaN DP clip norm": (
        with_header(lambda h: setattr(h.privacy, "clip_norm", float("nan"))),
        INVALID,
    ),
    "infinite DP clip norm": (
        with_header(lambda h: setattr(h.privacy, "clip_norm", float("inf"))),
        INVALID,
    ),
    "negative DP noise": (
        with_header(
            lambda h: (
                setattr(h.privacy, "clip_norm", 1.0),
                setattr(h.privacy, "noise_multiplier", -1.0),
            )
        ),
        INVALID,
    ),
    "DP clip norm beyond float32": (
        with_header(lambda h: setattr(h.privacy, "clip_norm", 1e300)),
        INVALID,
    ),
    "DP noise std beyond float32": (
        with_header(
            lambda h: (
                setattr(h.privacy, "clip_norm", 1e20),
                setattr(h.privacy, "noise_multiplier", 1e20),
            )
        ),
        INVALID,
    ),
    "DP without parameter gradients": (
        with_header(
            lambda h: (
                setattr(h.privacy, "clip_norm", 1.0),
                setattr(h.outputs, "skip_parameter_gradients", True),
            )
        ),
        INVALID,
    ),
    # an option of the other optimiser would be ignored: refused instead
    "sgd momentum sent with adam": (
        with_header(
            lambda h: (
                setattr(h.optimizer, "kind", pb.OPTIMIZER_KIND_ADAM),
                setattr(h.optimizer, "steps", 1),
                setattr(h.optimizer, "learning_rate", 0.1),
                setattr(h.optimizer, "momentum", 0.9),
            )
        ),
        INVALID,
    ),
    "adam eps sent with sgd": (
        with_header(
            lambda h: (
                setattr(h.optimizer, "kind", pb.OPTIMIZER_KIND_SGD),
                setattr(h.optimizer, "steps", 1),
                setattr(h.optimizer, "learning_rate", 0.1),
                setattr(h.optimizer, "eps", 1e-6),
            )
        ),
        INVALID,
    ),
    "float64 on an engine that lacks it": (
        with_header(
            lambda h: (
                setattr(h, "precision", pb.PRECISION_FLOAT64),
                setattr(h, "backend", pb.BACKEND_TRITON),
            )
        ),
        UNIMPLEMENTED,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_job_gets_its_status_code(stub, case):
    stream, code = CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Compute(iter(stream), timeout=30))
    assert err.value.code() == code, err.value.details()
    assert err.value.details()


def test_torch_ignore_index_targets_are_refused_saying_how_to_leave_samples_out(stub):
    """torch's CrossEntropyLoss skips targets of -100 by default; here they are no class,
    and the refusal says what to do instead."""
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Compute(iter(ce_targets(-100)), timeout=30))
    assert err.value.code() == INVALID
    assert "[-100, -100]" in err.value.details() and "ignore_index" in err.value.details()


def test_header_then_silence_hits_the_upload_idle_timeout(stub):
    release = threading.Event()

    def stream():
        yield valid_stream()[0]
        release.wait(30)

    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Compute(stream(), timeout=30))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()


@pytest.mark.parametrize("streamed", [False, True])
def test_every_byte_sent_without_a_half_close_is_told_to_half_close(stub, streamed):
    """A client that sends all of a job but keeps its request stream open, waiting for the
    results first, hits the upload idle timeout (the server starts a job, or sends a
    streamed job's summary, at the half-close); the error says what was awaited."""
    release = threading.Event()
    messages = valid_stream()
    if streamed:  # ten micro-batches, per-model targets
        from tests.server.test_streamed_jobs import per_model_order, raw_stream, shared_job

        params, x, y, _ = shared_job(2, 100, weights=False)
        raw = raw_stream(params, x, np.stack([y, y]), per_model_order(params, [0, 1]))
        messages = [pb.ComputeRequest.FromString(message) for message in raw]

    def stream():
        yield from messages
        release.wait(30)

    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Compute(stream(), timeout=30))
    finally:
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "every tensor byte arrived, but the request stream was not half-closed" in (
        err.value.details()
    )


def test_nan_inputs_are_accepted_when_allowed(stub):
    stream = nan_inputs()
    stream[0].header.allow_non_finite = True
    responses = list(stub.Compute(iter(stream), timeout=30))
    assert responses[-1].HasField("summary")


def test_server_serves_a_valid_job_after_all_bad_ones(stub, limited_server):
    for stream, _ in CASES.values():
        try:
            list(stub.Compute(iter(stream), timeout=30))
        except grpc.RpcError:
            pass
    responses = list(stub.Compute(iter(valid_stream()), timeout=30))
    assert responses[0].HasField("accepted") and responses[-1].HasField("summary")
    assert limited_server.process.poll() is None
    assert not any("Traceback" in line for line in limited_server.log)


# Random mutations of a valid job: each test above names one kind of bad input; these
# combine them with awkward values (finite doubles beyond float32, NaN, huge sizes, broken
# chunk sequences). Whatever the mutation, the answer is a job's result or an error of the
# job's own (never INTERNAL or UNKNOWN, a fault of the server).
EXTREMES = [1e300, -1e300, 1e39, 1e-300, 5e-324, 3e38, float("nan"), float("inf"), -1.0, 0.0]


def _some(r, repeated):
    return repeated[r.randrange(len(repeated))]


def _mutate_header(r, h: pb.JobHeader) -> None:
    arch, opt = h.architecture, h.optimizer
    mutation = r.randrange(12)
    if mutation == 0:
        arch.layer_sizes[r.randrange(len(arch.layer_sizes))] = r.choice([0, -1, 10**12, 7])
    elif mutation == 1:
        arch.output_activation.kind = r.choice([99, -3, pb.ACTIVATION_KIND_LEAKY_RELU])
        arch.output_activation.negative_slope = r.choice(EXTREMES)
    elif mutation == 2:
        h.loss.kind = r.choice([pb.LOSS_KIND_HUBER, 77])
        h.loss.huber_delta = r.choice(EXTREMES)
    elif mutation == 3:
        h.precision, h.backend = r.choice([1, 2, 3, 4, 5, 42]), r.choice([1, 2, 3, 9])
    elif mutation == 4:
        h.gradient_dtype = r.choice([1, 2, 3, 4, 5, 6, 100])
    elif mutation == 5:
        d = _some(r, h.tensors)
        d.shape[r.randrange(len(d.shape))] = r.choice([0, -1, 2**40, 1, 3])
    elif mutation == 6:
        _some(r, h.tensors).dtype = r.choice([0, 1, 2, 3, 4, 5, 6, 99])
    elif mutation == 7:
        _some(r, h.tensors).name = r.choice(["", "inputs", "layers.9.weight", "x" * 1000])
    elif mutation == 8:
        h.response_chunk_bytes = r.choice([-1, 1, 2**40])
        h.micro_batch_samples = r.choice([-1, 0, 1, 3, 2**40])
    elif mutation == 9:
        h.privacy.clip_norm = r.choice(EXTREMES)
        h.privacy.noise_multiplier = r.choice(EXTREMES)
    else:
        opt.kind, opt.steps = r.choice([0, 1, 2, 3, 9]), r.choice([0, -1, 2, 10**9])
        opt.learning_rate, opt.weight_decay = r.choice(EXTREMES), r.choice(EXTREMES)
        opt.momentum, opt.dampening, opt.eps = (r.choice(EXTREMES) for _ in range(3))
        opt.beta1, opt.beta2 = r.choice([0.9, 1e-300, 1 - 2**-53, 1.0, -0.5]), 0.999
    if r.random() < 0.3:
        h.precision = r.choice([pb.PRECISION_FLOAT32, pb.PRECISION_FLOAT64])


def _mutate_chunks(r, chunks: list) -> None:
    mutation = r.randrange(6)
    i = r.randrange(len(chunks))
    name, offset, data = chunks[i]
    if mutation == 0:
        chunks[i] = (name, r.choice([-1, 1, 10**12]), data)
    elif mutation == 1:
        chunks[i] = (name, offset, data[: r.randrange(len(data))])
    elif mutation == 2:
        chunks[i] = (name, offset, data + b"\0" * r.choice([1, 4, 1000]))
    elif mutation == 3:
        chunks.append(chunks[i])
    elif mutation == 4:
        chunks.append(("nope", 0, b"abcd"))
    else:
        chunks[i] = (name, offset, np.full(len(data) // 4, np.nan, np.float32).tobytes())


def mutated_stream(seed: int) -> list[pb.ComputeRequest]:
    r = random.Random(seed)
    loss = r.choice(["mse", "cross_entropy"])
    header = valid_stream(loss)[0].header
    tensors = valid_tensors(loss)
    chunks = [(k, 0, v.tobytes()) for k, v in tensors.items()]
    for _ in range(r.choice([1, 1, 2])):
        if r.random() < 0.7:
            _mutate_header(r, header)
        else:
            _mutate_chunks(r, chunks)
    stream = [pb.ComputeRequest(header=header)] + [
        pb.ComputeRequest(chunks=[pb.TensorChunk(name=k, offset=o, data=d)]) for k, o, d in chunks
    ]
    if r.random() < 0.05:
        stream.insert(r.randrange(1, len(stream) + 1), pb.ComputeRequest(header=header))
    if r.random() < 0.05:
        stream = stream[1:]
    return stream


def test_random_mutations_of_a_job_never_fault_the_server(stub, limited_server):
    faults = []
    for seed in range(600):
        try:
            list(stub.Compute(iter(mutated_stream(seed)), timeout=30))
        except grpc.RpcError as e:
            assert e.details(), seed
            if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                faults.append((seed, e.code().name, e.details()))
    assert not faults, faults[:5]
    responses = list(stub.Compute(iter(valid_stream()), timeout=30))
    assert responses[-1].HasField("summary")
    assert not any("Traceback" in line for line in limited_server.log)
