"""grpc.health.v1 Check without the grpcio-health-checking package (the thin client has
only grpcio, protobuf and numpy): both messages have a single field, encoded here."""

from __future__ import annotations

import grpc

CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _encode_request(service: str) -> bytes:
    """HealthCheckRequest{service = 1}."""
    name = service.encode()
    if not name:
        return b""
    if len(name) > 127:
        raise ValueError("service name too long")
    return b"\x0a" + bytes([len(name)]) + name


def _decode_status(raw: bytes) -> str:
    """HealthCheckResponse{status = 1 (enum)} -> status name."""
    status, pos = 0, 0
    while pos < len(raw):
        tag = raw[pos]
        pos += 1
        if tag != 0x08:
            break  # only field 1 (varint) is defined
        status = shift = 0
        while True:
            byte = raw[pos]
            pos += 1
            status |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return STATUS_NAMES.get(status, "UNKNOWN")


def check(channel: grpc.Channel, service: str = "", timeout: float | None = None):
    """The server's health status name for `service` ("" = the whole server); on an asyncio
    channel, an awaitable of it."""
    call = channel.unary_unary(
        CHECK_METHOD, request_serializer=_encode_request, response_deserializer=_decode_status
    )
    return call(service, timeout=timeout)
