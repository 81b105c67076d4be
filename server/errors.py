"""The one exception that ends a job with a gRPC status the caller can act on."""

from __future__ import annotations

import grpc


class JobError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> JobError:
    return JobError(grpc.StatusCode.INVALID_ARGUMENT, message)


def too_large(message: str) -> JobError:
    return JobError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unsupported(message: str) -> JobError:
    return JobError(grpc.StatusCode.UNIMPLEMENTED, message)
