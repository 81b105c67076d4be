"""Copy-saving codec for the messages that carry tensor bytes.

`ComputeRequest.chunks` and `ComputeResponse.chunks` hold almost every byte of a job. Going
through the protobuf runtime costs three copies of each payload per side (building the
message, serialising, and materialising `.data` after parsing). These helpers produce and
read the exact protobuf encoding directly:

- encode_chunk(): the same bytes as
  `ComputeRequest(chunks=[TensorChunk(...)]).SerializeToString()` (tested), made with one
  join of a small prefix and the payload. Serialized protobuf messages concatenate into
  their merge, so header bytes + several encoded chunks form one valid message carrying
  them all (that is how small tensors travel together);
- decode_request() / decode_response(): a message holding exactly one chunk, in the
  canonical field order, becomes a RawChunkMessage whose chunk data is a zero-copy
  memoryview of the received bytes; every other message (several chunks, a header, a
  summary, unknown fields from another language's library) goes through the protobuf
  parser unchanged.

Any client that speaks the .proto interoperates: this is only a faster route to the same
wire format. Request and response chunks are both field 2, so one encoding serves both
directions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from gradserve.v1 import gradserve_pb2 as pb

_CHUNK_TAG = 0x12  # field 2 (chunks), wire type 2 (length-delimited)
_NAME_TAG = 0x0A  # TensorChunk.name: field 1, length-delimited
_OFFSET_TAG = 0x10  # TensorChunk.offset: field 2, varint
_DATA_TAG = 0x1A  # TensorChunk.data: field 3, length-delimited
_CHUNK_KEY, _OFFSET_KEY, _DATA_KEY = bytes([_CHUNK_TAG]), bytes([_OFFSET_TAG]), bytes([_DATA_TAG])


_ONE_BYTE_VARINTS = [bytes([value]) for value in range(0x80)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:  # most lengths of small chunks' fields
        return _ONE_BYTE_VARINTS[value]
    value &= (1 << 64) - 1  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


@functools.lru_cache(maxsize=1024)
def _name_field(name: str) -> bytes:
    """TensorChunk.name's encoding (a job's tensors are few, their chunks many)."""
    name_bytes = name.encode()
    return bytes([_NAME_TAG]) + _varint(len(name_bytes)) + name_bytes if name_bytes else b""


def encode_chunk(name: str, offset: int, data) -> bytes:
    """Serialized ComputeRequest/ComputeResponse holding one TensorChunk (concatenate
    several, or append them to a serialized header, for a message holding them all)."""
    size = len(data)
    inner_head = b"".join((
        _name_field(name),
        _OFFSET_KEY + _varint(offset) if offset else b"",
        _DATA_KEY + _varint(size) if size else b"",
    ))  # fmt: skip
    return b"".join((_CHUNK_KEY, _varint(len(inner_head) + size), inner_head, data))


@dataclass
class RawChunk:
    name: str
    offset: int
    data: memoryview


@dataclass
class RawChunkMessage:
    """Stands in for a ComputeRequest/ComputeResponse holding exactly one chunk."""

    chunk: RawChunk

    @property
    def chunks(self) -> list[RawChunk]:
        return [self.chunk]

    def HasField(self, _: str) -> bool:  # noqa: N802 - mirrors the protobuf message API
        return False


def _decode_chunk(raw: bytes) -> RawChunkMessage | None:
    """The canonical encoding of a chunk message, or None for anything else."""
    buf = memoryview(raw)
    if not buf or buf[0] != _CHUNK_TAG:
        return None
    try:
        length, pos = _read_varint(buf, 1)
        if pos + length != len(buf):
            return None
        name, offset, data = "", 0, buf[0:0]
        if pos < len(buf) and buf[pos] == _NAME_TAG:
            size, pos = _read_varint(buf, pos + 1)
            name = bytes(buf[pos : pos + size]).decode()
            pos += size
        if pos < len(buf) and buf[pos] == _OFFSET_TAG:
            offset, pos = _read_varint(buf, pos + 1)
            if offset >= 1 << 63:
                offset -= 1 << 64
        if pos < len(buf) and buf[pos] == _DATA_TAG:
            size, pos = _read_varint(buf, pos + 1)
            data = buf[pos : pos + size]
            pos += size
        if pos != len(buf):
            return None
    except (ValueError, UnicodeDecodeError):
        return None
    return RawChunkMessage(RawChunk(name, offset, data))


class MalformedMessage:
    """Stands in for bytes that are no valid message, so the server can answer
    INVALID_ARGUMENT itself (a raising deserializer would make gRPC answer INTERNAL)."""

    chunks: tuple = ()

    def HasField(self, _: str) -> bool:  # noqa: N802
        return False


def decode_request(raw: bytes):
    chunk = _decode_chunk(raw)
    if chunk is not None:
        return chunk
    try:
        return pb.ComputeRequest.FromString(raw)
    except DecodeError:
        return MalformedMessage()


def decode_response(raw: bytes):
    return _decode_chunk(raw) or pb.ComputeResponse.FromString(raw)


def encode_message(message) -> bytes:
    """Serializer for both directions: pre-encoded chunks pass through untouched."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


COMPUTE_METHOD = "/gradserve.v1.GradientService/Compute"
