"""Wire tensors <-> torch tensors: dtype tables, raw little-endian bytes, chunking."""

from __future__ import annotations

import grpc
import numpy as np
import torch

from gradserve.server.errors import JobError
from gradserve.v1 import gradserve_pb2 as pb

TORCH_DTYPES = {
    pb.DATA_TYPE_FLOAT32: torch.float32,
    pb.DATA_TYPE_FLOAT64: torch.float64,
    pb.DATA_TYPE_FLOAT16: torch.float16,
    pb.DATA_TYPE_BFLOAT16: torch.bfloat16,
    pb.DATA_TYPE_INT64: torch.int64,
    pb.DATA_TYPE_INT32: torch.int32,
}
ITEM_SIZES = {
    pb.DATA_TYPE_FLOAT32: 4,
    pb.DATA_TYPE_FLOAT64: 8,
    pb.DATA_TYPE_FLOAT16: 2,
    pb.DATA_TYPE_BFLOAT16: 2,
    pb.DATA_TYPE_INT64: 8,
    pb.DATA_TYPE_INT32: 4,
}
FLOAT_DTYPES = (
    pb.DATA_TYPE_FLOAT32,
    pb.DATA_TYPE_FLOAT64,
    pb.DATA_TYPE_FLOAT16,
    pb.DATA_TYPE_BFLOAT16,
)
INT_DTYPES = (pb.DATA_TYPE_INT64, pb.DATA_TYPE_INT32)


def nbytes(dtype: int, shape) -> int:
    """Byte size of a tensor, in Python ints (no overflow for absurd declared shapes)."""
    size = ITEM_SIZES[dtype]
    for d in shape:
        size *= d
    return size


def tensor_from_bytes(buffer: np.ndarray, dtype: int, shape) -> torch.Tensor:
    """Zero-copy view of received bytes (a uint8 array) as a tensor of the wire dtype."""
    return torch.from_numpy(buffer).view(TORCH_DTYPES[dtype]).reshape(tuple(shape))


def tensor_to_bytes(tensor: torch.Tensor, dtype: int, name: str = "a result") -> memoryview:
    """Cast to the wire dtype, move to host, return its raw bytes. A float narrowed to a
    type too small for one of its values (float16's limit is 65504) is a JobError naming
    the tensor, not an infinity in its place."""
    wire_dtype = TORCH_DTYPES[dtype]
    if tensor.device.type == "cpu" and tensor.dtype == wire_dtype and tensor.is_contiguous():
        return memoryview(tensor.detach().numpy()).cast("B")  # already wire bytes: no copy
    t = tensor.detach().to(wire_dtype)
    if t.is_floating_point() and t.element_size() < tensor.element_size():
        _check_fits(tensor.detach(), t, name)
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship its bit pattern
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _check_fits(source: torch.Tensor, narrowed: torch.Tensor, name: str) -> None:
    if bool(torch.isfinite(narrowed).all()):
        return
    overflow = torch.isinf(narrowed) & torch.isfinite(source)  # NaN and inf stay what they are
    count = int(overflow.sum())
    if count:
        largest = float(source[overflow].abs().max())
        raise JobError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"{name}: {count} values beyond the range of {str(narrowed.dtype)[6:]} "
            f"(largest magnitude {largest:.4g}, the type's limit "
            f"{torch.finfo(narrowed.dtype).max:.4g}); ask for a wider gradient_dtype",
            field="gradient_dtype",
        )


def descriptor(name: str, dtype: int, shape) -> pb.TensorDescriptor:
    return pb.TensorDescriptor(name=name, dtype=dtype, shape=list(shape))


assert np.little_endian, "gradserve's wire format is little-endian; big-endian hosts unsupported"
