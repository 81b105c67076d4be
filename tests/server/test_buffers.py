"""Large payload buffers come back for the next job of the same size, never while in use."""

import numpy as np
import pytest
import torch

from gradserve.server.buffers import BufferPool, MiB


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_a_freed_buffer_serves_the_next_job_of_its_size():
    pool = BufferPool(max_bytes=64 * MiB)
    first = pool.empty(8 * MiB)
    first[:] = 7
    where = address(first)
    del first
    assert pool.free_bytes == 8 * MiB
    again = pool.empty(8 * MiB)
    assert address(again) == where and pool.reused == 1 and pool.free_bytes == 0
    other = pool.empty(9 * MiB)  # another size: a new buffer
    assert address(other) != where and pool.reused == 1


def test_a_buffer_is_not_reused_while_a_tensor_views_it():
    pool = BufferPool(max_bytes=64 * MiB)
    array = pool.empty(4 * MiB)
    tensor = torch.from_numpy(array).view(torch.float32).reshape(1024, 1024)
    tensor.fill_(3.0)
    del array
    assert pool.free_bytes == 0  # the tensor still holds it
    fresh = pool.empty(4 * MiB)
    fresh[:] = 0
    assert float(tensor.sum()) == 3.0 * 1024 * 1024
    del tensor
    assert pool.free_bytes == 4 * MiB


def test_kept_bytes_stay_within_the_bound_and_small_buffers_are_not_pooled():
    pool = BufferPool(max_bytes=10 * MiB)
    arrays = [pool.empty(4 * MiB) for _ in range(3)]
    del arrays
    assert pool.free_bytes == 8 * MiB  # the third would pass the bound: the oldest went
    small = pool.empty(MiB)
    del small
    assert pool.free_bytes == 8 * MiB
    assert BufferPool(max_bytes=0).empty(8 * MiB).nbytes == 8 * MiB


@pytest.mark.parametrize("nbytes", [4 * MiB, 4 * MiB + 3])
def test_pooled_buffers_are_writable_uint8_of_the_asked_size(nbytes):
    array = BufferPool(max_bytes=64 * MiB).empty(nbytes)
    assert array.dtype == np.uint8 and array.nbytes == nbytes and array.flags.writeable
