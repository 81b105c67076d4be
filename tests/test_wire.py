"""The copy-saving chunk codec speaks exactly the protobuf wire format."""

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import wire

names = st.text(max_size=40)
offsets = st.integers(min_value=-(2**63), max_value=2**63 - 1)
payloads = st.binary(max_size=3000)


@given(names, offsets, payloads)
def test_encode_chunk_equals_protobuf_serialization(name, offset, data):
    expected = pb.ComputeRequest(
        chunks=[pb.TensorChunk(name=name, offset=offset, data=data)]
    ).SerializeToString()
    assert wire.encode_chunk(name, offset, memoryview(data)) == expected
    response = pb.ComputeResponse(chunks=[pb.TensorChunk(name=name, offset=offset, data=data)])
    assert wire.encode_chunk(name, offset, data) == response.SerializeToString()


@given(names, offsets, payloads)
def test_decode_reads_what_protobuf_wrote(name, offset, data):
    raw = pb.ComputeRequest(chunks=[pb.TensorChunk(name=name, offset=offset, data=data)])
    for decoded in (
        wire.decode_request(raw.SerializeToString()),
        wire.decode_response(raw.SerializeToString()),
    ):
        assert isinstance(decoded, wire.RawChunkMessage) and not decoded.HasField("header")
        (c,) = decoded.chunks
        assert (c.name, c.offset, bytes(c.data)) == (name, offset, data)


@given(st.lists(st.tuples(names, offsets, payloads), min_size=1, max_size=4))
def test_header_and_encoded_chunks_concatenate_into_one_message(pieces):
    header = pb.ComputeRequest(header=pb.JobHeader(client_tag="t")).SerializeToString()
    raw = header + b"".join(wire.encode_chunk(n, o, d) for n, o, d in pieces)
    decoded = wire.decode_request(raw)
    assert decoded.header.client_tag == "t"
    assert [(c.name, c.offset, bytes(c.data)) for c in decoded.chunks] == pieces


def test_chunk_with_unknown_fields_falls_back_to_protobuf():
    chunk = pb.TensorChunk(name="inputs", offset=4, data=b"abcd")
    raw = pb.ComputeRequest(chunks=[chunk]).SerializeToString() + b"\x28\x01"  # field 5 varint
    decoded = wire.decode_request(raw)
    assert isinstance(decoded, pb.ComputeRequest)
    assert decoded.chunks[0].data == b"abcd"


def test_header_messages_go_through_protobuf():
    header = pb.ComputeRequest(header=pb.JobHeader(client_tag="x"))
    decoded = wire.decode_request(header.SerializeToString())
    assert decoded.HasField("header") and decoded.header.client_tag == "x"


@given(st.binary(max_size=200))
def test_garbage_never_raises(raw):
    decoded = wire.decode_request(raw)
    assert isinstance(decoded, (pb.ComputeRequest, wire.RawChunkMessage, wire.MalformedMessage))


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x12\x80", b"\x0a\x05ab"])
def test_garbage_bytes_get_invalid_argument_from_the_server(server, garbage):
    with grpc.insecure_channel(server.address) as channel:
        raw_call = channel.stream_stream("/gradserve.v1.GradientService/Compute")
        with pytest.raises(grpc.RpcError) as err:
            list(raw_call(iter([garbage]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_generated_stub_interoperates_with_the_server(server):
    """A client built from the .proto alone (the generated stub) gets the same answer."""
    import numpy as np

    w = np.ones((1, 1, 2), np.float32)
    tensors = {
        "layers.0.weight": w,
        "layers.0.bias": np.zeros((1, 1), np.float32),
        "inputs": np.array([[1.0, 2.0]], np.float32),
        "targets": np.array([[0.0]], np.float32),
    }
    header = pb.JobHeader(
        architecture=pb.Architecture(layer_sizes=[2, 1]),
        tensors=[
            pb.TensorDescriptor(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=v.shape)
            for k, v in tensors.items()
        ],
    )
    requests = [pb.ComputeRequest(header=header)] + [
        pb.ComputeRequest(chunks=[pb.TensorChunk(name=k, data=v.tobytes())])
        for k, v in tensors.items()
    ]
    with grpc.insecure_channel(server.address) as channel:
        responses = list(pb_grpc.GradientServiceStub(channel).Compute(iter(requests)))
    chunks = {c.name: c.data for r in responses for c in r.chunks}
    # y = 1 + 2 = 3, mse loss = 9, dL/dW = 2 * 3 * x = [6, 12]
    assert np.frombuffer(chunks["loss"], np.float32).tolist() == [9.0]
    assert np.frombuffer(chunks["layers.0.weight.grad"], np.float32).tolist() == [6.0, 12.0]
