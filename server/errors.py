"""The one exception that ends a job with a gRPC status the caller can act on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import torch


class JobError(Exception):
    """`field` names the offending part of the job (e.g. "tensors[inputs].shape"); it is
    sent as a google.rpc.BadRequest field violation beside the status message."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        # Sent as the grpc-retry-pushback-ms trailer when set: the wait before a retry, or
        # -1 for "do not retry" (gRPC's convention for a negative pushback).
        self.retry_pushback_ms: int | None = None


def invalid(message: str, field: str | None = None) -> JobError:
    return JobError(grpc.StatusCode.INVALID_ARGUMENT, message, field)


def too_large(message: str, field: str | None = None) -> JobError:
    """Over a configured limit: the same job will be refused again, so no retry."""
    error = JobError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, field)
    error.retry_pushback_ms = -1
    return error


def no_memory() -> JobError:
    """The engine could not allocate the job's memory: other jobs may free some (or another
    replica have it), so a retry may succeed."""
    return JobError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the device ran out of memory for this job")


def unsupported(message: str, field: str | None = None) -> JobError:
    return JobError(grpc.StatusCode.UNIMPLEMENTED, message, field)


@contextlib.contextmanager
def refusing_out_of_memory() -> Iterator[None]:
    """An engine allocation that fails inside ends the job with no_memory(), not INTERNAL."""
    try:
        yield
    except Exception as e:
        if not out_of_memory(e):
            raise
        raise no_memory() from None


def out_of_memory(error: Exception) -> bool:
    """An engine's allocation failed: CUDA's OutOfMemoryError, or the RuntimeError torch's
    CPU allocator raises (the job is too large for this machine, not a fault of the
    server)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def status_details(error: JobError) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying a google.rpc.Status with a BadRequest field violation, as
    grpcio-status would send it; empty without a field or without googleapis-common-protos."""
    if error.field is None:
        return ()
    try:
        from google.rpc import code_pb2, error_details_pb2, status_pb2
    except ImportError:
        return ()
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=error.field, description=error.message
            )
        ]
    )
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message)
    status.details.add().Pack(bad_request)
    return (("grpc-status-details-bin", status.SerializeToString()),)
