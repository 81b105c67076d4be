"""Result buffers of a multi-message job are paged in before their chunks arrive."""

from types import SimpleNamespace

import numpy as np

from gradserve.client._job import PREFAULT_BYTES, ResultAssembler
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import wire

LARGE = PREFAULT_BYTES // 4 + 3  # float32 elements: just over the prefault size
SMALL = 5


def accepted(*chunks: bytes) -> pb.ComputeResponse:
    head = pb.ComputeResponse(
        accepted=pb.JobAccepted(
            results=[
                pb.TensorDescriptor(name="big", dtype=pb.DATA_TYPE_FLOAT32, shape=[LARGE]),
                pb.TensorDescriptor(name="small", dtype=pb.DATA_TYPE_FLOAT32, shape=[SMALL]),
            ]
        )
    ).SerializeToString()
    return pb.ComputeResponse.FromString(b"".join((head, *chunks)))


def test_accepted_alone_pages_in_only_the_large_buffers_then_chunks_fill_them():
    assembler = ResultAssembler(SimpleNamespace(on_step=None, on_progress=None))
    assembler.add(accepted())
    assert [b.nbytes for b in assembler.untouched] == [LARGE * 4]
    assembler.prefault()
    assert assembler.untouched == []
    data = np.random.default_rng(0).standard_normal(LARGE).astype(np.float32).tobytes()
    half = len(data) // 2
    for offset, piece in ((0, data[:half]), (half, data[half:])):
        assembler.add(wire.decode_response(wire.encode_chunk("big", offset, piece)))
    assert assembler.buffers["big"].tobytes() == data


def test_accepted_with_results_pages_in_nothing():
    assembler = ResultAssembler(SimpleNamespace(on_step=None, on_progress=None))
    small = np.arange(SMALL, dtype=np.float32).tobytes()
    assembler.add(accepted(wire.encode_chunk("small", 0, small)))
    assert assembler.untouched == []
    assert assembler.buffers["small"].tobytes() == small
