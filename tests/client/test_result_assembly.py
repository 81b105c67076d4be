"""Result buffers of a multi-message job are paged in before their chunks arrive; a
streamed job's per-sample results are taken as the server sends them, each model's rows a
run of their own."""

from types import SimpleNamespace

import numpy as np
import pytest

from gradserve.client._job import PREFAULT_BYTES, ResultAssembler
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import wire

LARGE = PREFAULT_BYTES // 4 + 3  # float32 elements: just over the prefault size
SMALL = 5


def plain_job(micro_batch_samples: int = 0) -> SimpleNamespace:
    header = pb.JobHeader(micro_batch_samples=micro_batch_samples)
    return SimpleNamespace(on_step=None, on_progress=None, header=header)


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
    assembler = ResultAssembler(plain_job())
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
    assembler = ResultAssembler(plain_job())
    small = np.arange(SMALL, dtype=np.float32).tobytes()
    assembler.add(accepted(wire.encode_chunk("small", 0, small)))
    assert assembler.untouched == []
    assert assembler.buffers["small"].tobytes() == small


M, N, MICRO = 3, 10, 4  # micro-batches of samples 0-3, 4-7, 8-9


def streamed_accepted() -> pb.ComputeResponse:
    return pb.ComputeResponse(
        accepted=pb.JobAccepted(
            results=[
                pb.TensorDescriptor(
                    name="per_sample_loss", dtype=pb.DATA_TYPE_FLOAT32, shape=[M, N]
                ),  # fmt: skip
                pb.TensorDescriptor(name="loss", dtype=pb.DATA_TYPE_FLOAT32, shape=[M]),
            ]
        )
    )


def micro_batch_chunks(rows: np.ndarray, start: int, end: int) -> list[bytes]:
    """Each model's rows of samples start..end where they go, as the server sends them."""
    run = rows.shape[1] * 4
    return [wire.encode_chunk("per_sample_loss", m * run + start * 4, rows[m, start:end].tobytes())
            for m in range(M)]  # fmt: skip


def test_a_streamed_jobs_per_sample_rows_fill_their_places_model_by_model():
    rows = np.random.default_rng(1).standard_normal((M, N)).astype(np.float32)
    assembler = ResultAssembler(plain_job(micro_batch_samples=MICRO))
    assembler.add(streamed_accepted())
    for start in range(0, N, MICRO):
        for chunk in micro_batch_chunks(rows, start, min(N, start + MICRO)):
            assembler.add(wire.decode_response(chunk))
    assert assembler.buffers["per_sample_loss"].view(np.float32).tolist() == rows.ravel().tolist()
    assert [sum(r) for r in assembler.received.values()] == [M * N * 4, 0]


@pytest.mark.parametrize("case", ["a model's rows skip a micro-batch", "rows run into the next "
                                  "model's", "a one-shot job's rows model by model"])  # fmt: skip
def test_per_sample_rows_out_of_place_are_a_protocol_error(case):
    from gradserve.client import GradserveError

    rows = np.ones((M, N), dtype=np.float32)
    assembler = ResultAssembler(plain_job(0 if "one-shot" in case else MICRO))
    assembler.add(streamed_accepted())
    chunks = micro_batch_chunks(rows, 0, MICRO)
    if case == "a model's rows skip a micro-batch":
        chunks = chunks + [micro_batch_chunks(rows, MICRO * 2, N)[1]]
    elif case.startswith("rows run into"):
        chunks = [wire.encode_chunk("per_sample_loss", 0, rows[:, :MICRO].tobytes())]
    with pytest.raises(GradserveError) as error:
        for chunk in chunks:
            assembler.add(wire.decode_response(chunk))
    assert "malformed response stream" in str(error.value)
