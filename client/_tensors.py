"""Array <-> wire conversion with numpy only; torch is used when (and only when) the caller
passed torch tensors, and is imported lazily so the thin client never needs it."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradserve.v1 import gradserve_pb2 as pb

NUMPY_DTYPES = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_BFLOAT16: np.dtype("<u2"),  # bit pattern; widened to float32 for numpy callers
}
WIRE_DTYPES = {
    np.dtype("float32"): pb.DATA_TYPE_FLOAT32,
    np.dtype("float64"): pb.DATA_TYPE_FLOAT64,
    np.dtype("float16"): pb.DATA_TYPE_FLOAT16,
    np.dtype("int64"): pb.DATA_TYPE_INT64,
    np.dtype("int32"): pb.DATA_TYPE_INT32,
}
DATA_TYPE_BY_NAME = {
    "float32": pb.DATA_TYPE_FLOAT32,
    "float64": pb.DATA_TYPE_FLOAT64,
    "float16": pb.DATA_TYPE_FLOAT16,
    "bfloat16": pb.DATA_TYPE_BFLOAT16,
}


def dtype_name(dtype: int) -> str:
    """A wire DataType's name as the client's options spell it ("bfloat16")."""
    return pb.DataType.Name(dtype).removeprefix("DATA_TYPE_").lower()


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def accelerator_of(*values: Any) -> Any:
    """The device of the first torch tensor among `values` when it is not the CPU (a CUDA
    caller's results go back there, as torch would give them), else None."""
    for x in values:
        if is_torch(x) and getattr(x, "device", None) is not None:
            return None if x.device.type == "cpu" else x.device
    return None


def to_wire(x: Any, name: str = "tensor") -> tuple[int, tuple[int, ...], memoryview]:
    """(wire dtype, shape, raw bytes) of a numpy array, torch tensor or nested list. Values
    that are no real numbers (complex, text, dates) are refused (TypeError naming the
    tensor): converting them would drop the imaginary part or fail deep inside numpy."""
    if is_torch(x):
        import torch

        t = x.detach().cpu().contiguous()
        if t.is_complex():
            raise TypeError(f"{name}: complex tensors are not accepted (dtype {t.dtype})")
        if t.dtype == torch.bfloat16:
            return pb.DATA_TYPE_BFLOAT16, tuple(t.shape), raw_bytes(t.view(torch.int16).numpy())
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()  # float8 and the like, which numpy lacks: widened exactly
        if t.dtype == torch.bool or not (
            t.is_floating_point() or t.dtype in (torch.int32, torch.int64)
        ):
            t = t.long()
        x = t.numpy()
    a = np.asarray(x)
    if a.dtype.kind in "iub":
        a = a.astype(np.int64, copy=False) if a.dtype not in WIRE_DTYPES else a
    elif a.dtype.kind == "O":  # e.g. a list mixing numbers and 0-d tensors
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: holds values that are no numbers") from None
    elif a.dtype.kind != "f":
        raise TypeError(f"{name}: dtype {a.dtype} is not accepted; send real numbers")
    elif a.dtype not in WIRE_DTYPES:
        a = a.astype(np.float64)  # float128 and the like
    a = np.asarray(a, order="C")  # (np.ascontiguousarray would make a 0-d array [1])
    if a.dtype.byteorder == ">":  # the wire is little-endian
        a = a.astype(a.dtype.newbyteorder("<"))
    return WIRE_DTYPES[a.dtype], tuple(a.shape), raw_bytes(a)


def with_values(x: Any, name: str) -> Any:
    """A torch tensor as one holding its values in order: a sparse one (COO, CSR, ...) made
    dense, as the wire carries every value; one on the meta device, which holds no values,
    refused (TypeError naming the tensor). Anything else as it is."""
    if not is_torch(x):
        return x
    import torch

    if x.device.type == "meta":
        raise TypeError(f"{name}: a tensor on the meta device holds no values to send")
    return x if x.layout == torch.strided else x.to_dense()


def whole_as_floats(x: Any) -> Any:
    """An integer or bool array or tensor as float64, anything else as it is. Sample weights
    may be counts (a bootstrap's resampling) or a mask, and the targets of a loss on real
    values 0/1 labels or whole numbers: torch's type promotion takes them as floats
    (`loss * weights`, `mse_loss`). float64 is exact for them; a job in float32 then rounds
    them to float32 as any float64 array, exact up to 2**24."""
    if is_torch(x):
        import torch

        whole = x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex())
        return x.double() if whole else x
    if isinstance(x, np.ndarray) and x.dtype.kind in "iub":
        return x.astype(np.float64)
    return x


def check_floating(x: Any, name: str) -> None:
    """Refuse a bool or integer array for a tensor the networks compute with (every tensor
    but the targets, which may be class indices, and the sample weights, whole_as_floats):
    TypeError naming the tensor and the caller's dtype, as torch refuses such inputs to
    nn.Linear. Sent, a bool array would go as int64 and the server's refusal would name
    INT64, a dtype the caller never used."""
    if is_torch(x):
        import torch

        bad = x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex())
    else:
        bad = isinstance(x, np.ndarray) and x.dtype.kind in "iub"
    if bad:
        raise TypeError(f"{name}: dtype {x.dtype} is not accepted; send floating-point numbers")


# The largest finite float32; the server refuses a float64 value beyond it in a job that
# computes in float32, naming the tensor (server/assembly.check_values).
FLOAT32_MAX = float(np.finfo(np.float32).max)


def float64_as_float32(x: Any) -> Any:
    """A float64 array or tensor rounded to float32, for a job that computes in float32
    (every precision but float64): the engines round their float64 inputs to float32 first,
    to nearest as numpy and torch do here, so the results are the same bits and the upload
    half the bytes. Anything else, and float64 values beyond float32's range (the server
    names them), is returned as it is."""
    if is_torch(x):
        import torch

        if x.dtype != torch.float64 or x.numel() == 0:
            return x
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        return x if max(-low, high) > FLOAT32_MAX else x.detach().to(torch.float32)
    if not isinstance(x, np.ndarray) or x.dtype != np.float64 or x.size == 0:
        return x
    low, high = float(x.min()), float(x.max())
    return x if max(-low, high) > FLOAT32_MAX else x.astype(np.float32)


def raw_bytes(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array as a flat memoryview whose len() is its byte count.
    (memoryview.cast refuses an empty shape such as [0, 4], so go through numpy's views.)"""
    return memoryview(a.reshape(-1).view(np.uint8))


def from_wire(buffer: np.ndarray, dtype: int, shape, as_torch: bool):
    """Decode received bytes (uint8 array) to a numpy array (bfloat16 widened to float32) or
    a torch tensor, without copying."""
    raw = buffer.view(NUMPY_DTYPES[dtype]).reshape(tuple(shape))
    if as_torch:
        import torch

        t = torch.from_numpy(raw.copy() if not raw.flags.writeable else raw)
        return t.view(torch.bfloat16) if dtype == pb.DATA_TYPE_BFLOAT16 else t
    if dtype == pb.DATA_TYPE_BFLOAT16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw
