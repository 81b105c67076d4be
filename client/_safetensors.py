"""Minimal safetensors reader/writer on numpy alone (no pickle, no extra dependency).

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw tensor bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct

import numpy as np

from gradserve.client._files import replacing
from gradserve.client._tensors import raw_bytes

_TO_CODE = {
    np.dtype("float32"): "F32",
    np.dtype("float64"): "F64",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("uint8"): "U8",
}
_FROM_CODE = {v: k for k, v in _TO_CODE.items()}
# Header sizes beyond this are refused rather than parsed (the reference library's bound).
_MAX_HEADER = 100 << 20


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None,
         bfloat16=()):  # fmt: skip
    """`bfloat16`: names of float32 tensors that hold bfloat16 values (widened from it, as
    load and the client widen them), stored as BF16: their upper 16 bits, exactly."""
    header: dict = {}
    offset = 0
    arrays = []
    for name, value in tensors.items():
        a = np.asarray(value, order="C")  # 0-d stays 0-d (np.ascontiguousarray: [1])
        code = _TO_CODE.get(a.dtype)
        if name in bfloat16:
            if a.dtype != np.float32 or (a.view(np.uint32) & 0xFFFF).any():
                raise ValueError(f"{name}: holds values that are not bfloat16")
            a, code = (a.view(np.uint32) >> 16).astype("<u2"), "BF16"
        if code is None:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored")
        header[name] = {
            "dtype": code,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    with replacing(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(raw_bytes(a))


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata). The file is memory-mapped, not read: the tensors are read-only
    views of it whose pages are read as they are used, so a job file larger than memory can
    go out as a streamed job, its samples read from disk as they are sent. bfloat16 tensors
    are widened to float32 (copies)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 8:  # (an empty file cannot be mapped)
            raise ValueError(f"{path}: not a safetensors file (too short)")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(_MAX_HEADER, len(data) - 8):
        raise ValueError(f"{path}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is no JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: the safetensors metadata is no JSON object of strings")
    body = memoryview(data)[8 + length :]
    tensors = {}
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            code = info["dtype"]
            shape = info["shape"]
            if not isinstance(shape, list):
                raise TypeError
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: tensor {name!r} needs dtype, shape and two data_offsets"
            ) from None
        if not all(_natural(v) for v in (begin, end, *shape)):
            raise ValueError(
                f"{path}: tensor {name!r}: its shape and data_offsets must be whole numbers "
                f">= 0, not {list(shape)} and {[begin, end]}"
            )
        if not begin <= end <= len(body):
            raise ValueError(f"{path}: tensor {name!r} lies outside the file")
        if not isinstance(code, str) or (code != "BF16" and code not in _FROM_CODE):
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        nbytes = math.prod(shape) * (2 if code == "BF16" else _FROM_CODE[code].itemsize)
        if end - begin != nbytes:
            raise ValueError(
                f"{path}: tensor {name!r}: shape {list(shape)} of {code} takes {nbytes} bytes, "
                f"its data_offsets hold {end - begin}"
            )
        if code == "BF16":
            bits = np.frombuffer(body[begin:end], dtype="<u2").astype(np.uint32) << 16
            tensors[name] = bits.view(np.float32).reshape(shape)
            continue
        tensors[name] = np.frombuffer(body[begin:end], dtype=_FROM_CODE[code]).reshape(shape)
    return tensors, metadata


def _natural(value) -> bool:
    """A JSON whole number >= 0 (not a bool, a float or text)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
